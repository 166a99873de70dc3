"""Two LGM steps on a tiny ViT, for tests/test_multiprocess.py.

`setup()` and `run_steps()` are shared by the test (one process, 8 devices) and by this script,
which runs as one of several processes joined with `jax.distributed`:

    python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz

Each process puts its own contiguous block of the global real batch on its local devices, as
`distill.run` does, and writes the final levels and the step losses to OUT.npz.
"""

from __future__ import annotations

import sys

import numpy as np

NUM_STEPS = 2


def setup():
    """(features, cfg, tx, state, params, real [8, 32, 32, 3] uint8, labels [8]) on the host."""
    import jax
    import jax.numpy as jnp

    from lgm_jax import augment, lgm
    from lgm_jax.models import dinov2, vit

    vcfg = dinov2.variant("S/14").replace(
        width=32, depth=2, heads=2, mlp_dim=64, pos_grid=4, image_size=28, layer_scale=False
    )
    model = vit.ViT(vcfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
    features = lambda p, x: model.apply({"params": p}, x)
    cfg = lgm.StepConfig(
        num_classes=4,
        ipc=1,
        aug_rounds=2,
        syn_res=32,
        probe_std=1.0,
        chunk_size=1,
        augment=augment.AugmentConfig(out_res=28),
    )
    tx = lgm.optimizer()
    state = lgm.init_state(jax.random.key(0), cfg, tx, start_res=[1, 2])
    real = np.random.default_rng(0).integers(0, 256, (cfg.num_real, 32, 32, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 0, 0, 1, 2], np.int32)
    return features, cfg, tx, state, params, real, labels


def replicate(tree, sharding):
    """`jax.device_put(tree, sharding)` that also works for typed PRNG keys across processes.

    With several processes, `device_put` of a key array (such as `State.rng`) onto a sharding
    that spans non-addressable devices raises "device_put's second argument must be a Device or
    a Sharding which represents addressable devices" (JAX 0.10); plain arrays are fine. So the
    key's raw data goes through `device_put` and is wrapped again.
    """
    import jax

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def run_steps(num_steps: int = NUM_STEPS):
    """`num_steps` sharded steps over all devices of all processes: (levels, losses) as numpy."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lgm_jax import lgm

    features, cfg, tx, state, params, real, labels = setup()
    mesh = lgm.data_mesh()
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = replicate(state, replicated)
    params = replicate(params, replicated)
    per_process = cfg.num_real // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    real = jax.make_array_from_process_local_data(sharded, real[rows])
    labels = jax.make_array_from_process_local_data(sharded, labels[rows])
    step = lgm.make_step(features, 32, tx, cfg, mesh=mesh)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, params, real, labels)
        losses.append(float(metrics["loss"]))  # replicated, so readable in every process
    return [np.asarray(level) for level in state.levels], np.array(losses)


def main(argv):
    port, process_id, num_processes, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices",
        flush=True,
    )
    levels, losses = run_steps()
    np.savez(
        out,
        losses=losses,
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        **{f"level{i}": lv for i, lv in enumerate(levels)},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
