"""The report's pipeline timeline: operation orders of the schedules and their timing, checked against orders and
bubbles derived by hand from the schedules' definitions (Narayanan et al. SC'21 sec. 2.2; Qi et al. 2024)."""

from __future__ import annotations

import pytest

from paraplan.cost_models.costs import pipeline_time_s
from paraplan.report.schedule import Op, OpTimes, ScheduleError, order_1f1b, schedule_order, simulate


def _ops(text: str, stage: int) -> list[Op]:
    return [Op(tok[0], stage, int(tok[1:])) for tok in text.split()]


def _uniform(n_stages: int, t_f: float, t_b: float, t_w: float = 0.0) -> dict[int, OpTimes]:
    """Every virtual stage: forward t_f, full backward t_b, of which t_w is the weight gradient."""
    return {k: OpTimes(forward=(("forward", t_f),), backward=(("backward", t_b),),
                       input_grad=(("backward", t_b - t_w),), weight_grad=(("weight gradient", t_w),))
            for k in range(n_stages)}


def test_1f1b_order_pp4_m8_by_hand():
    # PipeDream-Flush: rank r runs p - r forwards (warm-up, the last one starting steady state), then alternates
    # one backward and one forward, then drains the remaining backwards.
    order = order_1f1b(4, 8)
    assert order[0] == _ops("F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7", 0)
    assert order[1] == _ops("F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7", 1)
    assert order[2] == _ops("F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7", 2)
    assert order[3] == _ops("F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7", 3)


def test_1f1b_with_fewer_micro_batches_than_stages_runs_all_forwards_first():
    assert order_1f1b(4, 2)[0] == _ops("F0 F1 B0 B1", 0)


def test_1f1b_bubble_is_p_minus_1_times_tf_plus_tb():
    # Equal stages, t_f = 1, t_b = 2: step (m + p - 1)(t_f + t_b) = 11 x 3; each rank idles (p - 1)(t_f + t_b) = 9.
    tl = simulate(order_1f1b(4, 8), _uniform(4, 1.0, 2.0))
    assert tl.pipeline_s == pytest.approx(33.0)
    assert tl.bubble_s == pytest.approx([9.0] * 4)
    # The cost model's closed form for the same stage times (w = 1 for 1F1B).
    assert tl.pipeline_s == pytest.approx(pipeline_time_s(8, 1.0, [3.0] * 4))


def test_1f1b_unequal_stages_between_the_slowest_stage_bound_and_the_closed_form():
    # Stage 1 is twice as slow. Its 8 forwards and backwards (8 x 6 s) cannot start before stage 0's first forward
    # (1 s) nor end before stage 0's last backward (2 s) can run: >= 51 s. The closed form m max + (sum - max)
    # = 48 + 10.5 prices every micro-batch's fill and drain through all stages: an upper bound.
    times = {k: OpTimes(forward=(("forward", c),), backward=(("backward", 2 * c),))
             for k, c in enumerate((1.0, 2.0, 1.0, 1.5))}
    tl = simulate(order_1f1b(4, 8), times)
    assert 51.0 <= tl.pipeline_s <= pipeline_time_s(8, 1.0, [3.0, 6.0, 3.0, 4.5]) + 1e-9


def test_interleaved_bubble_divides_by_v():
    # torch's ScheduleInterleaved1F1B order, pp = 4, v = 2, m = 8, each chunk t_f = 1, t_b = 2: a rank's work per
    # micro-batch is v (t_f + t_b) = 6; the bubble shrinks to (p - 1)(t_f + t_b) = 9 (sec. 2.2.2: (p-1)/v of a
    # rank's micro-batch time), so the pipeline is 8 x 6 + 9 = 57 = the closed form with w = 1/v.
    tl = simulate(schedule_order("interleaved_1f1b", 4, 2, 8), _uniform(8, 1.0, 2.0))
    assert tl.pipeline_s == pytest.approx(57.0)
    assert tl.bubble_s == pytest.approx([9.0] * 4)
    assert tl.pipeline_s == pytest.approx(pipeline_time_s(8, 0.5, [6.0] * 4))


@pytest.mark.parametrize("t_f,t_b,t_w", [(1.0, 2.0, 1.0), (1.0, 1.5, 0.5), (2.0, 2.0, 1.0)])
def test_zero_bubble_h1_bubble_matches_the_paper(t_f, t_b, t_w):
    # Qi et al. 2024 sec. 3.1: ZB-H1 idles (p - 1)(T_F + T_B - T_W) with T_B the input-gradient part (t_b - t_w),
    # against 1F1B's (p - 1)(T_F + T_B + T_W).
    p, m = 4, 8
    times = _uniform(p, t_f, t_b, t_w)
    zb = simulate(schedule_order("zero_bubble", p, 1, m), times)
    assert zb.bubble_s == pytest.approx([(p - 1) * (t_f + (t_b - t_w) - t_w)] * p)
    one = simulate(order_1f1b(p, m), times)
    assert one.bubble_s == pytest.approx([(p - 1) * (t_f + t_b)] * p)


def test_zbv_runs_every_operation_once_in_v_placement():
    order = schedule_order("zbv", 4, 2, 8)
    ops = [op for rank_ops in order.values() for op in rank_ops]
    for kind in ("F", "I", "W"):
        assert sorted((op.stage, op.micro_batch) for op in ops if op.kind == kind) == \
            [(k, i) for k in range(8) for i in range(8)]
    assert {op.stage for op in order[0]} == {0, 7}  # rank 0 holds the first and the last chunk


def test_tail_follows_the_last_operation():
    tl = simulate(order_1f1b(2, 2), _uniform(2, 1.0, 1.0), {0: (("optimizer step", 0.5),), 1: ()})
    assert tl.pipeline_s == pytest.approx((2 + 1) * 2.0)
    assert tl.end_s == pytest.approx([6.5, 5.0])  # rank 1's last backward ends one backward before rank 0's


def test_deadlocked_order_is_reported():
    order = {0: [Op("B", 0, 0), Op("F", 0, 0)]}  # backward of the only stage before its forward
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(order, _uniform(1, 1.0, 1.0))
