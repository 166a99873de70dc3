"""The distillation run: set up (mesh, data, backbone, restore or init), loop (grow, step, log,
checkpoint), finish (export, evaluate).

    distill.run(config, workdir)

Everything random in a step comes from `fold_in(key, step)` and the real batch of step s is
batch s of the data pipeline, so a run resumed from a checkpoint produces the same synthetic
images as one that was never interrupted. Adding a pyramid level is a host-side event between
jitted steps (the state's shapes change and the step re-traces).

Workdir layout:
    checkpoints/<step>/     orbax checkpoints (lgm_jax/checkpoint.py), the last few kept
    synthetic.npz           the distilled set (lgm_jax/distilled.py), at the end
    images/step_<s>.png     a grid of the synthetic images every `image_every` steps
    images/class_<c>.png    one PNG per class at the end, and images/final.png, all of them
    config.json             the run's config
    events.*                TensorBoard: metrics (loss, steps/s, images/s), the synthetic grid
                            every image_every steps, the run's config as text
    profile/                with config.profile.start >= 0: a trace of a few steps
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from lgm_jax import accelerators, checkpoint, config_base, distilled, lgm, profiling, pyramid
from lgm_jax.errors import InputError
from lgm_jax.prefetch import prefetch_map
from lgm_jax.stops import NonFiniteGuard, Stop

log = logging.getLogger("lgm_jax")


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
    return distilled.to_uint8(x)


def export(levels, step: int, config, workdir: str, class_names) -> str:
    """Write the distilled set (synthetic.npz) and its pictures from host levels."""
    images = to_images(levels, config)
    labels = np.repeat(np.arange(len(class_names), dtype=np.int32), config.ipc)
    path = distilled.save(
        workdir,
        images,
        labels,
        class_names,
        dataset=config.dataset,
        backbone=config.backbone,
        method="distilled",
        step=step,
    )
    distilled.save_pictures(distilled.ImageSet(images, labels), os.path.join(workdir, "images"))
    return path


def grow_state(state: lgm.State, tx, mode: str, place) -> lgm.State:
    """`lgm.grow` as one jitted program whose output is laid out by `place(shapes)`, so that it
    works on a state spread over several processes' devices."""
    fn = lambda s: lgm.grow(s, tx, mode)
    return jax.jit(fn, out_shardings=place(jax.eval_shape(fn, state)), donate_argnums=0)(state)


def _real_source(config, ds, step_cfg, params, process_index, process_count):
    """A function step -> (real rows, labels) for this process, deterministic in the step."""
    per_process = step_cfg.num_real // process_count
    if config.real_input == "features":
        return _cached_source(config, ds, step_cfg, params, process_index, per_process)

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


def _cached_source(config, ds, step_cfg, params, process_index, per_process):
    from lgm_jax import feature_cache

    if not config.feature_cache:
        raise InputError("real_input='features' needs --config.feature_cache=DIR")
    # The cache must hold this backbone's (same weights) features of this dataset.
    expect = {
        "dataset": ds.name,
        "backbone": config.backbone,
        "syn_res": config.syn_res,
        "fingerprint": feature_cache.fingerprint(params),
    }
    cache = feature_cache.FeatureCache.open(config.feature_cache, expect=expect)

    def from_cache(step):
        feats, labels = cache.sample(config.seed, step, step_cfg.num_real)
        sl = slice(process_index * per_process, (process_index + 1) * per_process)
        return feats[sl], labels[sl]

    return from_cache


@dataclasses.dataclass
class Run:
    """Everything a run's loop needs, made once by `setup`."""

    config: ml_collections.ConfigDict
    workdir: str
    ds: object
    step_cfg: lgm.StepConfig
    mesh: jax.sharding.Mesh
    params: object
    tx: object
    place: object
    mngr: object
    ident: dict
    step_fn: object
    real_at: object
    is_main: bool


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, lgm.State, int]:
    """(the run, its state, the step to start at): restored from the workdir's latest
    checkpoint, or initialised (and the config written) when there is none."""
    from lgm_jax import data

    config_base.check(config)  # every setting in range before anything slow
    if config.get("distributed", False):
        jax.distributed.initialize()
    if warning := accelerators.cpu_only_warning(jax.default_backend()):  # after initialize
        log.warning("%s", warning)
    if config.compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # Each pyramid level re-traces the step; a restarted (preempted) run finds its
        # programs here instead of compiling them again.
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError(f"--workdir {workdir} is a file, not a directory; name a directory")
    os.makedirs(workdir, exist_ok=True)
    ds = data.get_dataset(config.dataset, config.data_dir or None)
    if config.get("num_classes"):
        data.check_num_classes(ds, config.num_classes)
    step_cfg = config_base.step_config(config, ds.num_classes)
    mesh = lgm.data_mesh()
    lgm.check_split(step_cfg, mesh.size)  # before anything slow
    backbone, params = config_base.build_backbone(config)
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    tx = lgm.optimizer(config.lr)
    by_class = step_cfg.state_sharding == "class"
    place = lambda s: lgm.state_sharding(s, mesh, by_class)
    pidx, pcount = jax.process_index(), jax.process_count()
    run = Run(
        config=config,
        workdir=workdir,
        ds=ds,
        step_cfg=step_cfg,
        mesh=mesh,
        params=params,
        tx=tx,
        place=place,
        mngr=checkpoint.manager(workdir, config.keep_checkpoints),
        ident=checkpoint.identity(config, ds.num_classes),
        step_fn=lgm.make_step(backbone.features, backbone.feature_dim, tx, step_cfg, mesh=mesh),
        real_at=None,
        is_main=pidx == 0,
    )
    state, start = _restore_or_init(run)
    run.real_at = _real_source(config, ds, step_cfg, params, pidx, pcount)
    return run, state, start


def _restore_or_init(run: Run) -> tuple[lgm.State, int]:
    config = run.config
    template = lgm.init_state(
        jax.random.key(config.seed),
        run.step_cfg,
        run.tx,
        start_resolutions(config),
        config.pyramid.init_mode,
    )
    restored = checkpoint.restore(
        run.mngr, template, run.tx, run.ident, run.place, config.pyramid.init_mode
    )
    if restored is not None:
        state, _ = restored
        log.info("resumed from step %d (%d levels)", int(state.step), len(state.levels))
        return state, int(state.step)
    if run.is_main:
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    # From host copies: every process holds the same template and places its part of it.
    return jax.device_put(jax.device_get(template), run.place(template)), 0


def run(config: ml_collections.ConfigDict, workdir: str) -> lgm.State:
    """Distil config.dataset into config.ipc images per class; returns the final state."""
    r, state, start = setup(config, workdir)
    state, nonfinite = loop(r, state, start)
    levels = host_levels(state.levels)  # every process: may be a collective
    if r.is_main:
        path = export(levels, int(state.step), config, workdir, r.ds.class_names)
        log.info("wrote %s (%d non-finite steps skipped)", path, nonfinite)
        if config.eval.at_end:
            evaluate_run(config, workdir)
    return state


def loop(r: Run, state: lgm.State, start: int) -> tuple[lgm.State, int]:
    """Steps start..config.steps (the reference runs 0..steps inclusive), with growth, logs,
    pictures, checkpoints (and one on SIGTERM or Ctrl-C, which then exit with 143 or 130; a
    second Ctrl-C exits at once, writing nothing); returns the final
    state and how many non-finite steps were skipped."""
    config, last = r.config, r.config.steps
    sharded = jax.sharding.NamedSharding(r.mesh, jax.sharding.PartitionSpec("data"))

    def load(step):  # runs ahead of the step loop in a thread
        real, labels = r.real_at(step)
        real = jax.make_array_from_process_local_data(sharded, np.asarray(real))
        labels = jax.make_array_from_process_local_data(sharded, np.asarray(labels, np.int32))
        return real, labels

    logger = _Logger(r, start)
    guard = NonFiniteGuard(config.max_nonfinite, r.mngr.directory)
    stop = Stop()
    tracer = _tracer(r, start)
    batches = prefetch_map(load, range(start, last + 1), config.prefetch)
    try:
        for step, (real, labels) in zip(range(start, last + 1), batches):
            state = _maybe_grow(r, state, step, tracer)
            state, metrics = _traced_step(r, state, step, real, labels, tracer)
            guard.push(step, metrics["finite"])
            done = step + 1
            if done % config.log_every == 0 or step == last:
                logger.log(step, jax.device_get(metrics), guard, len(state.levels))
            if config.image_every and done % config.image_every == 0:
                logger.image(_save_step_grid(r, state, done), done)
            if stop.signal is not None:
                log.warning("%s: saving a checkpoint at step %d and stopping", stop.name, done)
                _checkpoint(r, state, guard)
                raise SystemExit(stop.status)
            if config.checkpoint_every and done % config.checkpoint_every == 0:
                _checkpoint(r, state, guard)
        _checkpoint(r, state, guard)
    finally:
        if tracer is not None:
            tracer.close()
        batches.close()
        stop.restore()
        logger.close()
    return state, guard.total


def _checkpoint(r: Run, state, guard) -> None:
    guard.check()  # never write a checkpoint past a run of failures
    checkpoint.save(r.mngr, state, checkpoint.record(state, r.ident, guard.total))


def _maybe_grow(r: Run, state, step: int, tracer):
    finest = state.levels[-1].shape[1]
    if not should_grow(r.config, step, finest):
        return state
    state = grow_state(state, r.tx, r.config.pyramid.init_mode, r.place)
    log.info("step %d: pyramid grows to %d px", step, finest * 2)
    if tracer is not None and tracer.active:
        log.warning(
            "the pyramid grew inside the profiled steps: the profile's wall time holds a "
            "compilation; choose another profile.start"
        )
    return state


def _tracer(r: Run, start: int):
    if not r.is_main or r.config.profile.start < start:
        return None
    folder = os.path.join(r.workdir, "profile")
    return profiling.StepTracer(folder, r.config.profile.start, r.config.profile.steps)


def _traced_step(r: Run, state, step: int, real, labels, tracer):
    if tracer is not None:
        tracer.before(step, state)
    state, metrics = r.step_fn(state, r.params, real, labels)
    if tracer is not None:
        hlo = functools.partial(_hlo_text, r.step_fn, state, r.params, real, labels)
        if (summary := tracer.after(step, state, hlo)) is not None:
            log.info("profile of steps %d..%d (%s):", tracer.start, step, tracer.folder)
            log.info("\n%s", profiling.format_summary(summary))
    return state, metrics


def _save_step_grid(r: Run, state, done: int) -> str | None:
    """images/step_<done>.png, a grid of the synthetic images; its path (None off process 0)."""
    levels = host_levels(state.levels)  # every process: may be a collective
    if not r.is_main:
        return None
    os.makedirs(os.path.join(r.workdir, "images"), exist_ok=True)
    path = os.path.join(r.workdir, "images", f"step_{done:06d}.png")
    distilled.save_grid(to_images(levels, r.config), path)
    return path


def _hlo_text(step_fn, *args) -> str:
    """The optimised HLO of the step compiled for these arguments (the persistent compilation
    cache usually holds it)."""
    return step_fn.lower(*args).compile().as_text()


class _Logger:
    """The progress line (loss, steps/s, images/s, ETA) and TensorBoard scalars, every
    log_every steps; the metrics are read from the device only then."""

    def __init__(self, r: Run, start: int):
        self.r, self.t_last, self.s_last = r, time.time(), start
        self.writer = _summary_writer(r.workdir) if r.is_main else None
        if self.writer is not None:  # the settings beside the curves (markdown: a code block)
            text = r.config.to_json_best_effort(indent=2)
            self.writer.add_text("config", "```\n" + text + "\n```", start)

    def image(self, png: str | None, step: int) -> None:
        """The grid PNG just written, as TensorBoard image "synthetic" at `step`."""
        if self.writer is None or png is None:
            return
        from PIL import Image

        with Image.open(png) as im:
            grid = np.asarray(im.convert("RGB"))
        self.writer.add_image("synthetic", grid, step, dataformats="HWC")
        self.writer.flush()

    def log(self, step: int, m: dict, guard, num_levels: int) -> None:
        guard.check()
        now, done, last = time.time(), step + 1, self.r.config.steps
        rate = (done - self.s_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.s_last = now, done
        if not self.r.is_main:
            return
        eta = (last + 1 - done) / max(rate, 1e-9)
        images_per_s = rate * 2 * self.r.step_cfg.num_real
        log.info(
            "step %5d/%d  loss %.5f  %.2f steps/s  %.0f img/s  levels %d  ETA %s",
            step,
            last,
            float(m["loss"]),
            rate,
            images_per_s,
            num_levels,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
        scalars = {
            "loss": float(m["loss"]),
            "steps_per_s": rate,
            "images_per_s": images_per_s,
            "nonfinite_steps": guard.total,
        }
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, done)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
