"""The distillation run: mesh, data, backbone, restore or init, grow, step, log, checkpoint, export.

    distill.run(config, workdir)

Everything random in a step comes from `fold_in(key, step)` and the real batch of step s is
batch s of the data pipeline, so a run resumed from a checkpoint produces the same synthetic
images as one that was never interrupted. Adding a pyramid level is a host-side event between
jitted steps (the state's shapes change and the step re-traces).

Workdir layout:
    checkpoints/<step>/     orbax checkpoints (state + run metadata), the last few kept
    synthetic.npz           images uint8 [N, res, res, 3], labels int32 [N] (at the end)
    images/step_<s>.png     a grid of the synthetic images every `image_every` steps
    images/class_<c>.png    one PNG per class at the end, and images/final.png, all of them
    config.json             the run's config
    events.*                TensorBoard metrics (loss, steps/s, images/s)
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lgm_jax import augment, lgm, profiling, pyramid

log = logging.getLogger("lgm_jax")

# Settings that define what a checkpoint is of: a workdir holding a checkpoint that differs in
# any of these belongs to another run and is refused.
IDENTITY_KEYS = ("dataset", "backbone", "ipc", "syn_res", "input_res", "pyramid.pixels")


class RunMismatch(ValueError):
    """The workdir holds a checkpoint of a different run."""


class NonFiniteLoss(RuntimeError):
    """The meta-loss stayed non-finite for too many steps in a row."""


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def step_config(config, num_classes: int) -> lgm.StepConfig:
    a = config.augment
    aug = augment.AugmentConfig(
        mode=a.mode,
        input_res=config.input_res,
        flip_p=a.flip_p,
        crop_scale=tuple(a.crop_scale),
        crop_ratio=tuple(a.crop_ratio),
        noise_p=a.noise_p,
        noise_std=a.noise_std,
        noise_mean=a.noise_mean,
    )
    return lgm.StepConfig(
        num_classes=num_classes,
        ipc=config.ipc,
        aug_rounds=config.aug_rounds,
        syn_res=config.syn_res,
        decorrelate_colors=config.decorrelate_colors,
        augment=aug,
        mean=tuple(config.mean),
        std=tuple(config.std),
        chunk_size=config.chunk_size or None,
        real_input=config.real_input,
        state_sharding=config.state_sharding,
    )


def start_resolutions(config) -> list[int]:
    """Levels at the start: [syn_res] for plain pixels, else start_res and everything coarser
    (normally just [1])."""
    if config.pyramid.pixels:
        return [config.syn_res]
    return pyramid.resolutions(1, config.pyramid.start_res)


def should_grow(config, step: int, finest: int) -> bool:
    """A level is added at steps 1 + k * grow_every (k >= 1) until the finest reaches syn_res."""
    every = config.pyramid.grow_every
    return (
        not config.pyramid.pixels
        and finest < config.syn_res
        and step > 1
        and (step - 1) % every == 0
    )


def host_levels(levels) -> tuple[np.ndarray, ...]:
    """The levels as host arrays on every process. Levels spread over several processes'
    devices are gathered (a collective: every process must call this)."""
    from jax.experimental import multihost_utils

    out = []
    for lvl in levels:
        if not isinstance(lvl, jax.Array) or lvl.is_fully_addressable:
            out.append(np.asarray(lvl))
        else:
            out.append(np.asarray(multihost_utils.process_allgather(lvl, tiled=True)))
    return tuple(out)


def to_images(levels, config) -> np.ndarray:
    """Decoded synthetic images as uint8 [N, syn_res, syn_res, 3] from host levels."""
    x = pyramid.decode(tuple(levels), config.syn_res, config.decorrelate_colors)
    return np.asarray(jnp.round(jnp.clip(x, 0, 1) * 255), np.uint8)


def save_grid(images: np.ndarray, path: str, cols: int | None = None) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    tmp = path + ".tmp.png"
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)


def export(levels, step: int, config, workdir: str, class_names) -> str:
    """Write synthetic.npz and one PNG per class (atomically) from host levels."""
    images = to_images(levels, config)
    labels = np.repeat(np.arange(len(class_names), dtype=np.int32), config.ipc)
    path = os.path.join(workdir, "synthetic.npz")
    tmp = path + ".tmp.npz"
    np.savez(
        tmp,
        images=images,
        labels=labels,
        class_names=np.asarray(class_names, dtype=str),
        step=step,
    )
    os.replace(tmp, path)
    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
    for c in range(len(class_names)):
        save_grid(images[labels == c], os.path.join(workdir, "images", f"class_{c}.png"))
    save_grid(images, os.path.join(workdir, "images", "final.png"))
    return path


# ----------------------------------------------------------------------------- checkpoints


def _to_saveable(state: lgm.State) -> dict:
    return {
        "step": state.step,
        "levels": list(state.levels),
        "opt_state": state.opt_state,
        "rng": state.rng,
    }


def _from_saveable(tree: dict) -> lgm.State:
    return lgm.State(
        step=tree["step"],
        levels=tuple(tree["levels"]),
        opt_state=tree["opt_state"],
        rng=tree["rng"],
    )


def identity(config, num_classes: int) -> dict:
    out = {k: _get(config, k) for k in IDENTITY_KEYS}
    out["num_classes"] = num_classes
    return out


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def checkpoint_meta(state: lgm.State, ident: dict, nonfinite_steps: int = 0) -> dict:
    """What a checkpoint records beside the state: whose run it is and how far it got."""
    return {
        "identity": ident,
        "num_levels": len(state.levels),
        "step": int(state.step),
        "nonfinite_steps": nonfinite_steps,
    }


def save_checkpoint(mngr, state, meta) -> None:
    step = int(state.step)
    if step in mngr.all_steps():
        return
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
        ),
    )
    mngr.wait_until_finished()


def grown_shapes(template: lgm.State, tx, num_levels: int, mode: str) -> lgm.State:
    """The shapes and dtypes of the state once its pyramid has `num_levels` levels."""

    def grown(state):
        while len(state.levels) < num_levels:
            state = lgm.grow(state, tx, mode)
        return state

    return jax.eval_shape(grown, template)


def restore_checkpoint(mngr, config, template: lgm.State, tx, ident: dict, place):
    """The latest checkpoint as (state, meta), or None; `place(shapes)` gives the shardings to
    restore into. Refuses another run's checkpoint."""
    step = mngr.latest_step()
    if step is None:
        return None
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("identity", {})
    diffs = {k: (saved.get(k), v) for k, v in ident.items() if saved.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise RunMismatch(
            f"{mngr.directory} holds a checkpoint of a different run ({detail}). "
            "Use a new --workdir, or set the config back to match the checkpoint."
        )
    # The state's structure at that step (levels grown to meta["num_levels"]), laid out as this
    # run wants it: a checkpoint restores onto any number of devices and either layout.
    shaped = grown_shapes(template, tx, meta["num_levels"], config.pyramid.init_mode)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        _to_saveable(shaped),
        _to_saveable(place(shaped)),
    )
    tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
        "state"
    ]
    return _from_saveable(tree), meta


# ----------------------------------------------------------------------------- the run


def grow_state(state: lgm.State, tx, mode: str, place) -> lgm.State:
    """`lgm.grow` as one jitted program whose output is laid out by `place(shapes)`, so that it
    works on a state spread over several processes' devices."""
    fn = lambda s: lgm.grow(s, tx, mode)
    return jax.jit(fn, out_shardings=place(jax.eval_shape(fn, state)), donate_argnums=0)(state)


def build_backbone(config):
    """(features_fn, params, feature_dim) for config.backbone (converted weights if given)."""
    from lgm_jax.models import registry

    if config.attention not in ("xla", "cudnn"):
        raise ValueError(f"attention must be 'xla' or 'cudnn', got {config.attention!r}")
    overrides = dict(
        input_res=config.input_res,
        dtype=config.dtype,
        remat=config.remat,
        remat_policy=config.remat_policy,
        attention=config.attention,
    )
    backbone, params = registry.build(config.backbone, config.weights or None, **overrides)
    return registry.features_fn(backbone), params, backbone.feature_dim


def _real_source(config, ds, step_cfg, params, process_index, process_count):
    """A function step -> (real rows, labels) for this process, deterministic in the step."""
    per_process = step_cfg.num_real // process_count
    if config.real_input == "features":
        from lgm_jax.data import feature_cache

        if not config.feature_cache:
            raise ValueError("real_input='features' needs --config.feature_cache=DIR")
        # The cache must hold this backbone's (same weights) features of this dataset.
        expect = {
            "dataset": ds.name,
            "backbone": config.backbone,
            "res": config.syn_res,
            "fingerprint": feature_cache.fingerprint(params),
        }
        cache = feature_cache.FeatureCache.open(config.feature_cache, expect=expect)

        def from_cache(step):
            feats, labels = cache.sample(config.seed, step, step_cfg.num_real)
            sl = slice(process_index * per_process, (process_index + 1) * per_process)
            return feats[sl], labels[sl]

        return from_cache

    from lgm_jax.data import pipeline

    source = ds.source("train")
    batches = pipeline.TrainBatches(
        source,
        pipeline.shard_indices(len(source), process_index, process_count),
        per_process,
        config.seed,
        config.syn_res,
        process_index,
        threads=config.data_threads,
    )

    def from_images(step):
        b = batches(step)  # batch `step` of the shuffled epochs: no iterator state to replay
        return b["image"], b["label"]

    return from_images


def run(config: ml_collections.ConfigDict, workdir: str) -> lgm.State:
    """Distil config.dataset into config.ipc images per class; returns the final state."""
    from lgm_jax import data

    if config.get("distributed", False):
        jax.distributed.initialize()
    if config.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Each pyramid level re-traces the step; a restarted (preempted) run finds its
        # programs here instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache))
    os.makedirs(workdir, exist_ok=True)
    ds = data.get_dataset(config.dataset, config.data_dir or None)
    if config.get("num_classes"):
        data.check_num_classes(ds, config.num_classes)
    num_classes = ds.num_classes
    step_cfg = step_config(config, num_classes)
    mesh = lgm.data_mesh()
    lgm.check_split(step_cfg, mesh.size)  # before anything slow
    pidx, pcount = jax.process_index(), jax.process_count()
    is_main = pidx == 0
    features, params, feat_dim = build_backbone(config)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = jax.device_put(params, replicated)
    tx = lgm.optimizer(config.lr)
    by_class = step_cfg.state_sharding == "class"
    place = lambda s: lgm.state_sharding(s, mesh, by_class)

    template = lgm.init_state(
        jax.random.key(config.seed),
        step_cfg,
        tx,
        start_resolutions(config),
        config.pyramid.init_mode,
    )
    mngr = checkpoint_manager(workdir, config)
    ident = identity(config, num_classes)
    restored = restore_checkpoint(mngr, config, template, tx, ident, place)
    if restored is None:
        # From host copies: every process holds the same template and places its part of it.
        state, start = jax.device_put(jax.device_get(template), place(template)), 0
        if is_main:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
    else:
        state, _ = restored
        start = int(state.step)
        log.info("resumed from step %d (%d levels)", start, len(state.levels))

    step_fn = lgm.make_step(features, feat_dim, tx, step_cfg, mesh=mesh)
    real_at = _real_source(config, ds, step_cfg, params, pidx, pcount)

    def load(step):  # runs ahead of the step loop in a thread
        real, labels = real_at(step)
        real = jax.make_array_from_process_local_data(sharded, np.asarray(real))
        labels = jax.make_array_from_process_local_data(sharded, np.asarray(labels, np.int32))
        return real, labels

    writer = _summary_writer(workdir) if is_main else None
    stop = {"sigterm": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    guard = NonFiniteGuard(config.max_nonfinite, mngr.directory)

    def checkpoint(s):
        guard.check()  # never write a checkpoint past a run of failures
        save_checkpoint(mngr, s, checkpoint_meta(s, ident, guard.total))

    tracer = None
    if is_main and config.profile.start >= start:
        tracer = profiling.StepTracer(
            os.path.join(workdir, "profile"), config.profile.start, config.profile.steps
        )
    t_last, s_last = time.time(), start
    last = config.steps  # the reference runs steps 0..steps inclusive
    batches = data.prefetch_map(load, range(start, last + 1), config.prefetch)
    try:
        for step, (real, labels) in zip(range(start, last + 1), batches):
            finest = state.levels[-1].shape[1]
            if should_grow(config, step, finest):
                state = grow_state(state, tx, config.pyramid.init_mode, place)
                log.info("step %d: pyramid grows to %d px", step, finest * 2)
                if tracer is not None and tracer.active:
                    log.warning(
                        "the pyramid grew inside the profiled steps: the profile's wall time "
                        "holds a compilation; choose another profile.start"
                    )
            if tracer is not None:
                tracer.before(step, state)
            state, metrics = step_fn(state, params, real, labels)
            if tracer is not None:
                hlo = functools.partial(_hlo_text, step_fn, state, params, real, labels)
                if (summary := tracer.after(step, state, hlo)) is not None:
                    log.info("profile of steps %d..%d (%s):", tracer.start, step, tracer.folder)
                    log.info("\n%s", profiling.format_summary(summary))
            guard.push(step, metrics["finite"])
            done = step + 1
            if done % config.log_every == 0 or step == last:
                m = jax.device_get(metrics)  # the one host sync every log_every steps
                guard.check()
                now = time.time()
                rate = (done - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, done
                eta = (last + 1 - done) / max(rate, 1e-9)
                if is_main:
                    log.info(
                        "step %5d/%d  loss %.5f  %.2f steps/s  %.0f img/s  levels %d  ETA %s",
                        step,
                        last,
                        float(m["loss"]),
                        rate,
                        rate * 2 * step_cfg.num_real,
                        len(state.levels),
                        time.strftime("%H:%M:%S", time.gmtime(eta)),
                    )
                    _write_scalars(
                        writer,
                        done,
                        {
                            "loss": float(m["loss"]),
                            "steps_per_s": rate,
                            "images_per_s": rate * 2 * step_cfg.num_real,
                            "nonfinite_steps": guard.total,
                        },
                    )
            if config.image_every and done % config.image_every == 0:
                levels = host_levels(state.levels)  # every process: may be a collective
                if is_main:
                    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
                    save_grid(
                        to_images(levels, config),
                        os.path.join(workdir, "images", f"step_{done:06d}.png"),
                    )
            if stop["sigterm"]:
                log.warning("SIGTERM: saving a checkpoint at step %d and stopping", done)
                checkpoint(state)
                raise SystemExit(143)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                checkpoint(state)
        checkpoint(state)
    finally:
        if tracer is not None:
            tracer.close()
        batches.close()
        signal.signal(signal.SIGTERM, old_handler)
        if writer is not None:
            writer.close()
    levels = host_levels(state.levels)
    if is_main:
        path = export(levels, int(state.step), config, workdir, ds.class_names)
        log.info("wrote %s (%d non-finite steps skipped)", path, guard.total)
        if config.eval.at_end:
            evaluate_run(config, workdir)
    return state


def _hlo_text(step_fn, *args) -> str:
    """The optimised HLO of the step compiled for these arguments (the persistent compilation
    cache usually holds it)."""
    return step_fn.lower(*args).compile().as_text()


class NonFiniteGuard:
    """Counts the steps whose update was skipped for a non-finite meta-loss, and stops the run
    when `limit` come in a row. The step's flags stay on the device until `check` (at log
    points and before checkpoints), so the loop never waits on a step just to look at it."""

    def __init__(self, limit: int, checkpoints):
        self.limit, self.checkpoints = limit, checkpoints
        self.pending, self.total, self.in_a_row = [], 0, 0

    def push(self, step: int, finite) -> None:
        self.pending.append((step, finite))

    def check(self) -> None:
        flags = jax.device_get([f for _, f in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        for step, ok in zip(steps, flags):
            if ok:
                self.in_a_row = 0
                continue
            self.total, self.in_a_row = self.total + 1, self.in_a_row + 1
            log.warning("step %d: non-finite meta-loss, update skipped", step)
            if self.limit and self.in_a_row >= self.limit:
                raise NonFiniteLoss(
                    f"the meta-loss was non-finite for {self.in_a_row} steps in a row (up to "
                    f"step {step}); the last good checkpoint in {self.checkpoints} is kept. "
                    "Lower the learning rate or use float32 compute."
                )


def evaluate_run(config, workdir: str) -> dict:
    """The paper's probe protocol on the run's synthetic images, with the distillation
    backbone; writes workdir/eval/<backbone>/eval.json."""
    from lgm_jax import evaluate

    result = evaluate.evaluate(
        [workdir],
        config.backbone,
        dataset=config.dataset,
        weights=config.weights or None,
        seeds=config.eval.seeds,
        epochs=config.eval.epochs,
        mode=config.eval.mode,
        input_res=config.syn_res,
        data_dir=config.data_dir or None,
    )
    log.info("evaluation: %s", evaluate.format_row(result))
    return result


def _summary_writer(workdir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # metrics still go to the log
        return None
    return SummaryWriter(workdir)


def _write_scalars(writer, step, scalars):
    if writer is None:
        return
    for k, v in scalars.items():
        writer.add_scalar(k, v, step)
    writer.flush()
