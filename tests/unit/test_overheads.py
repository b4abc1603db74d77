"""Backend overheads timed by `paraplan profile` (paraplan.backends.overheads): how the cost model turns the timed
extra passes into per-block and per-fetch overheads (hand arithmetic on the hand profile's links), that a
calibration re-pricing the links keeps the measured total, and one real two-process measurement."""

from __future__ import annotations

import pytest
from calibration_helpers import SEQ, hand_profile, synthetic_run
from conftest import make_plan

from paraplan.backends.overheads import profile_backend_overheads
from paraplan.cost_models.calibration import apply_calibration, fit_calibration, plan_costs_at, transform_inputs
from paraplan.cost_models.costs import predict
from paraplan.errors import ProfileError
from paraplan.models.presets import load_model_spec
from paraplan.types import BackendOverheads

SPEC = load_model_spec("llama-tiny")  # hidden 384, 6 layers
# The hand profile's gloo links: bus bandwidth 1 GB/s; latency = the 64 KiB all-reduce's 250 us minus its bytes.
BW, LAT = 1e9, 250e-6 - 65536 / 1e9
ACT = 2 * SEQ * SPEC.hidden * 4  # one micro-batch of 2 sequences' hidden states, fp32 bytes: one tp all-reduce


def _profile(backend: str = "torch", tp_extra: float | None = None, zero3_extra: float | None = None,
             blocks: int = 3):
    over = BackendOverheads(tp_extra_s=tp_extra, zero3_extra_s=zero3_extra, micro_batch_size=2, blocks=blocks)
    return hand_profile().model_copy(update={"backend_overheads": {backend: over}})


def _costs(profile, backend: str, **strategy):
    plan = make_plan(cluster="cpu:2", seq_len=SEQ, global_batch=8, micro_batch_size=2, **strategy)
    return plan, plan_costs_at(plan, *transform_inputs(plan.cluster, profile, 1, 1, 1, LAT, 1), backend)[0]


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_tp_overhead_is_the_extra_time_beyond_seven_priced_all_reduces(backend):
    """Both backends shard q, k, v, gate and up apart: 2 all-reduces forward and 5 backward per block
    (backend_profiles.DTENSOR_TP_COLLECTIVES), each ``latency + 2 (n-1)/n x bytes / bus bw`` = LAT + ACT / BW
    for n = 2."""
    priced = 7 * (LAT + ACT / BW)
    _, costs = _costs(_profile(backend, tp_extra=3 * (priced + 0.02)), backend, tp=2)
    assert costs.framework_overhead("tp") == pytest.approx(0.02, rel=1e-9)
    assert costs.framework_overhead("zero3") == 0.0  # not timed
    # Less extra time than the priced collectives is no overhead (never negative).
    assert _costs(_profile(backend, tp_extra=0.0), backend, tp=2)[1].framework_overhead("tp") == 0.0


@pytest.mark.parametrize("backend, units", [("torch", 1), ("deepspeed", 9)])
def test_zero3_overhead_is_per_fetch_unit_forward_and_backward(backend, units):
    """FSDP2 fetches a block as one unit, DeepSpeed per leaf module (q, k, v, o, gate, up, down, two RMSNorms):
    ``delta`` more seconds per fetch costs ``blocks x 2 x units x delta`` more per pass."""
    blocks, delta, base = 4, 0.003, 5.0  # base: extra time well above the priced traffic
    first = _costs(_profile(backend, zero3_extra=base, blocks=blocks), backend, dp=2, zero_stage=3)[1]
    more = _costs(_profile(backend, zero3_extra=base + blocks * 2 * units * delta, blocks=blocks), backend, dp=2,
                  zero_stage=3)[1]
    assert first.framework_overhead("zero3") > 0
    assert more.framework_overhead("zero3") - first.framework_overhead("zero3") == pytest.approx(delta, rel=1e-9)


def test_cost_model_adds_the_measured_overhead_of_its_backend_only():
    """tp = 2 on cpu:2 (no overlap): each of the L blocks takes the overhead once per micro-batch; the other
    backend's cost profile adds nothing; under `any` the larger one; a calibration's set value replaces it."""
    priced = 7 * (LAT + ACT / BW)
    measured = _profile("torch", tp_extra=3 * (priced + 0.02))

    def step(profile, backend):
        plan, costs = _costs(profile, backend, tp=2)
        return predict(costs, plan_costs_at(plan, *transform_inputs(plan.cluster, profile, 1, 1, 1, LAT, 1),
                                            backend)[1]).step_time_s, plan.strategy.grad_accum

    base, m = step(hand_profile(), "torch")
    assert step(measured, "torch")[0] - base == pytest.approx(SPEC.n_layers * m * 0.02, rel=1e-6)
    assert step(measured, "deepspeed")[0] == pytest.approx(step(hand_profile(), "deepspeed")[0])
    assert _costs(measured, "any", tp=2)[1].framework_overhead("tp") == pytest.approx(0.02, rel=1e-9)
    calibrated = measured.model_copy(update={"tp_block_overhead_s": 0.005})
    assert step(calibrated, "torch")[0] - base == pytest.approx(SPEC.n_layers * m * 0.005, rel=1e-6)


def test_calibration_without_tp_runs_keeps_the_measured_tp_total(tmp_path):
    """Calibrated on dp = 2 and pp = 2 only (their links re-fitted: TRUE link scale 2, latency 0.4 ms), a tp plan's
    overhead is taken beyond the all-reduces as the calibrated links price them: overhead + 7 calibrated
    all-reduces = the timed extra per block."""
    runs = [synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2)]
    cal = fit_calibration(runs)
    assert "tp" not in cal.mechanisms
    extra_per_block = 7 * (LAT + ACT / BW) + 0.02
    profile = _profile("torch", tp_extra=3 * extra_per_block)
    plan = make_plan(cluster="cpu:2", seq_len=SEQ, global_batch=8, micro_batch_size=2, tp=2)
    costs = plan_costs_at(plan, *apply_calibration(cal, plan.cluster, profile), "torch")[0]
    calibrated_all_reduce = cal.latency_s + ACT * cal.link_time_scale / BW
    assert costs.framework_overhead("tp") + 7 * calibrated_all_reduce == pytest.approx(extra_per_block, rel=1e-6)
    assert cal.link_time_scale != pytest.approx(1.0, abs=0.1)  # the links were re-priced


def test_refuses_what_it_cannot_time():
    gpu = hand_profile().model_copy(update={"device_kind": "cuda"})
    with pytest.raises(ProfileError, match="CPU"):
        profile_backend_overheads(gpu)
    with pytest.raises(ProfileError, match="--links"):
        profile_backend_overheads(hand_profile().model_copy(update={"links": []}))


def test_two_process_measurement_runs_every_backend():
    """The real job (torchrun, gloo, 2 ranks) on one block of llama-tiny: all four passes are timed."""
    from paraplan.profiler import profile_model

    prof = profile_model(SPEC, [1], 16, warmup=0, repeats=1, links=True)
    out = profile_backend_overheads(prof, blocks=1, warmup=0, repeats=1)
    assert set(out) == {"torch", "deepspeed"}
    for over in out.values():
        assert over.tp_extra_s is not None and over.zero3_extra_s is not None
        assert over.blocks == 1 and over.micro_batch_size == 1
