"""Measurements for `test_parallel.py`, run in a process with 8 simulated CPU devices.

The device count is fixed when JAX starts, so the test runs this file in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and checks the JSON it prints: the
largest differences between 1-device and N-device training and prediction.
"""

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.backbones import get_backbone
from vi_seg_jax.bayes.elbo import LikelihoodConfig, ObjectiveConfig
from vi_seg_jax.bayes.guide import GuideConfig
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.ops import ConvEngine
from vi_seg_jax.parallel import data_mesh, global_batch, process_rows, replicated
from vi_seg_jax.predict import Predictor, TrainedModel
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import BackboneConfig, DataConfig, TrainConfig
from vi_seg_jax.train.state import ModelSpec, OptimConfig, create_train_state
from vi_seg_jax.train.step import make_train_step
from vi_seg_jax.uncertainty import (
    add_samples,
    add_samples_per_device,
    empty_sums,
    num_chunks,
    posterior_predictive,
    sample_fn_for,
    sum_devices,
    summarize,
)

BATCH, STEPS = 8, 3
BATCH_3D, PATCH_3D = 4, (8, 8, 8)


def _spec():
    net = get_backbone("unet", num_classes=2, spatial_dims=2, features=(4, 8))
    objective = ObjectiveConfig(LikelihoodConfig(reduction="mean"), num_data=64.0)
    method = MethodConfig(guide=GuideConfig(init_log_var=-6.0))
    return ModelSpec(net, method, objective, OptimConfig(learning_rate=1e-2))


def _spec_3d():
    """A 3D U-Net whose convolutions are oneDNN's custom calls (the CPU default)."""
    net = get_backbone("unet", num_classes=2, features=(4, 8), conv=ConvEngine("onednn"))
    objective = ObjectiveConfig(LikelihoodConfig(reduction="mean"), num_data=64.0)
    method = MethodConfig(guide=GuideConfig(init_log_var=-6.0))
    return ModelSpec(net, method, objective, OptimConfig(learning_rate=1e-2))


def _batches(spatial=(16, 16), batch=BATCH):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(STEPS, batch, *spatial, 4)).astype(np.float32)
    labels = (images[..., 0] > 0.5).astype(np.uint8)
    return images, labels


def _train(spec, devices, batches=None):
    """Parameters after STEPS steps on `devices` devices (None: plain jit, one device)."""
    images, labels = _batches() if batches is None else batches
    batch_size = images.shape[1]
    mesh = None if devices is None else data_mesh(devices, batch_size=batch_size)
    sharding = None if mesh is None else replicated(mesh)
    state = create_train_state(jax.random.key(0), spec, images[0], sharding)
    step = make_train_step(spec, mesh)
    facts = {}
    for s in range(STEPS):
        batch = (images[s], labels[s])
        if mesh is not None:
            rows = process_rows(mesh, batch_size)
            batch = global_batch(mesh, (images[s][rows], labels[s][rows]), batch_size)
            facts["batch_devices"] = len(batch[0].sharding.device_set)
            facts["state_devices"] = len(
                jax.tree_util.tree_leaves(state.params)[0].sharding.device_set
            )
            if s == 0:
                hlo = step.lower(state, batch).compile().as_text()
                facts["all_reduce"] = "all-reduce" in hlo
                # Activations are never gathered: every op, custom calls and the noise's
                # generator included, works on the device's own rows.
                facts["all_gather"] = "all-gather" in hlo
                facts["whole_batch_shapes"] = _ops_on_whole_batch(hlo, images.shape[1:-1])
        state, _ = step(state, batch)
    return state, facts


def _ops_on_whole_batch(hlo: str, batch_shape) -> list[str]:
    """Custom calls and random bit generators of `hlo` whose result holds the whole batch
    (`batch_shape`: batch and spatial sizes), alone or under the particles' vmap."""
    whole = re.compile(r"\[(1,)?" + ",".join(map(str, batch_shape)) + ",")
    return [
        line.strip()[:120]
        for line in hlo.splitlines()
        if ("custom-call(" in line or "-> (u64[2], u32[" in line) and whole.search(line)
    ]


def _max_difference(a, b):
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


def _prediction(spec, state, mesh, num_samples, chunk_size):
    images = jax.random.normal(jax.random.key(5), (2, 16, 16, 4))
    sample_fn = sample_fn_for(spec, state)
    task = spec.objective.likelihood.task

    @jax.jit
    def scanned(key):
        return posterior_predictive(
            sample_fn, images, key, num_samples=num_samples, chunk_size=chunk_size, mesh=mesh
        )

    def stepped(key):
        """The Predictor's path: one jitted call per chunk (per device with a mesh)."""
        sums = empty_sums(sample_fn, images, key)
        sizes = dict(chunk_size=chunk_size, num_samples=num_samples, task=task)
        if mesh is None:
            add = jax.jit(
                lambda sums, step: add_samples(sums, sample_fn, images, key, step, **sizes)
            )
            steps = num_chunks(num_samples, chunk_size)
        else:
            sums = jax.tree_util.tree_map(
                lambda x: jnp.broadcast_to(x, (mesh.size, *x.shape)), sums
            )
            add = jax.jit(
                lambda sums, step: add_samples_per_device(
                    mesh, sums, sample_fn, images, key, step, **sizes
                )
            )
            steps = num_chunks(num_samples, chunk_size * mesh.size)
        for step in range(steps):
            sums = add(sums, jnp.asarray(step))
        return summarize(sums if mesh is None else sum_devices(sums), task)

    key = jax.random.key(9)
    return scanned(key), stepped(key)


def _volume_predictor_difference(devices):
    """Predictor (3D sliding windows, 5 samples) on `devices` devices against one device."""
    config = TrainConfig(
        backbone=BackboneConfig(features=(4, 8)), data=DataConfig(patch_shape=(8, 8, 8))
    )
    spec = build_spec(config, num_data=1.0)
    state = create_train_state(jax.random.key(0), spec, jnp.zeros((1, 8, 8, 8, 4)))
    wide = jax.tree_util.tree_map(lambda v: v + 4.0, state.guide.log_var)
    state = state.replace(guide=dataclasses.replace(state.guide, log_var=wide))
    model = TrainedModel(Path("."), config, spec, state, 0, {})
    volume = np.asarray(jax.random.normal(jax.random.key(1), (20, 12, 9, 4)))
    key = jax.random.key(2)
    kwargs = dict(num_samples=5, window_size=16, chunk_size=2)
    single = Predictor(model, **kwargs).predictive(volume, key)
    sharded = Predictor(model, mesh=data_mesh(devices), **kwargs).predictive(volume, key)
    return {
        "difference": _max_difference(single, sharded),
        "epistemic_max": float(np.max(single.epistemic)),
    }


def main():
    spec = _spec()
    single, _ = _train(spec, None)
    report = {"device_count": jax.device_count()}
    for devices in (2, 8):
        state, facts = _train(spec, devices)
        trained = (state.params, state.guide, state.opt_state)
        difference = _max_difference((single.params, single.guide, single.opt_state), trained)
        report[f"train_{devices}"] = {"max_difference": difference, **facts}
    moved = _max_difference(
        single.guide.loc, create_train_state(jax.random.key(0), spec, _batches()[0][0]).guide.loc
    )
    report["train_param_change"] = moved

    spec_3d, batches_3d = _spec_3d(), _batches(PATCH_3D, BATCH_3D)
    single_3d, _ = _train(spec_3d, None, batches_3d)
    for devices in (2, 4):  # 2 and 1 rows per device
        state, facts = _train(spec_3d, devices, batches_3d)
        trained = (state.params, state.guide, state.opt_state)
        difference = _max_difference(
            (single_3d.params, single_3d.guide, single_3d.opt_state), trained
        )
        report[f"train_3d_{devices}"] = {"max_difference": difference, **facts}
    # Per-member kernels: the convolutions map over the members, each split by rows.
    ensemble = dataclasses.replace(spec_3d, method=MethodConfig(method="ensemble", ensemble_size=2))
    single_ensemble, _ = _train(ensemble, None, batches_3d)
    state, facts = _train(ensemble, 2, batches_3d)
    difference = _max_difference(single_ensemble.params, state.params)
    report["train_3d_ensemble_2"] = {"max_difference": difference, **facts}

    for num_samples, chunk_size in ((10, 2), (3, 1)):
        base_scan, base_step = _prediction(spec, single, None, num_samples, chunk_size)
        mesh = data_mesh(8)
        state = jax.device_put(single, replicated(mesh))
        scan, step = _prediction(spec, state, mesh, num_samples, chunk_size)
        report[f"predict_T{num_samples}_chunk{chunk_size}"] = {
            "scan_vs_single": _max_difference(base_scan, scan),
            "stepped_vs_single": _max_difference(base_scan, step),
            "single_stepped_vs_scan": _max_difference(base_scan, base_step),
            "epistemic_max": float(np.max(np.asarray(base_scan.epistemic))),
        }
    report["predictor_4"] = _volume_predictor_difference(4)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
