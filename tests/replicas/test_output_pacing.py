"""Output pacing: streamed deltas thinned out only above the replica's cap, with the same
tokens and text in the end; first and last outputs never held; non-streamed folded."""

from __future__ import annotations

import pytest

from replicas.output_pacing import OutputPacer, StreamBudget
from replicas.outputs import RequestMetrics, RequestOutput


def _delta(step: int, last: bool = False, index: int = 0) -> RequestOutput:
    return RequestOutput("r", [step], f"t{step} ", last, "length" if last else None, 5, 0,
                         step + 1, None, RequestMetrics(), index=index)


def _run(pacer: OutputPacer, times: list[float]) -> list[RequestOutput]:
    sent = []
    for step, now in enumerate(times):
        out = pacer.offer(_delta(step, last=step == len(times) - 1), now)
        if out is not None:
            sent.append(out)
    return sent


def test_below_the_cap_every_delta_leaves() -> None:
    budget = StreamBudget(1000.0)
    with OutputPacer(budget, stream=True) as pacer:
        assert budget.num_sequences == 1
        sent = _run(pacer, [0.0, 0.1, 0.2, 0.3])
    assert budget.num_sequences == 0
    assert [o.new_token_ids for o in sent] == [[0], [1], [2], [3]]


def test_above_the_cap_deltas_merge_but_first_and_last_leave_at_once() -> None:
    budget = StreamBudget(10.0)  # NOTE: 5 sequences open -> one output per 0.5 s each
    budget.num_sequences = 4
    with OutputPacer(budget, stream=True) as pacer:
        assert budget.min_gap_s() == pytest.approx(0.5)
        sent = _run(pacer, [0.0, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert [o.new_token_ids for o in sent] == [[0], [1, 2, 3, 4], [5, 6]]
    assert "".join(o.text_delta for o in sent) == "".join(f"t{i} " for i in range(7))
    assert sent[-1].finished and sent[-1].num_output_tokens == 7
    assert not sent[0].finished and not sent[1].finished


def test_no_cap_and_not_streamed() -> None:
    with OutputPacer(StreamBudget(0.0), stream=True) as pacer:
        assert len(_run(pacer, [0.0] * 5)) == 5
    budget = StreamBudget(10.0)
    with OutputPacer(budget, stream=False, n=2) as pacer:
        assert budget.num_sequences == 0  # NOTE: a folded request sends nothing to pace
        sent = _run(pacer, [0.0, 1.0, 2.0])
    assert len(sent) == 1 and sent[0].new_token_ids == [0, 1, 2] and sent[0].finished


def test_sequences_of_one_request_are_paced_apart_and_released_on_error() -> None:
    budget = StreamBudget(2.0)
    with pytest.raises(RuntimeError), OutputPacer(budget, stream=True, n=2) as pacer:
        assert budget.num_sequences == 2
        assert pacer.offer(_delta(0, index=0), 0.0) is not None
        assert pacer.offer(_delta(0, index=1), 0.0) is not None  # its own first output
        assert pacer.offer(_delta(1, index=0), 0.5) is None  # gap 1 s
        out = pacer.offer(_delta(2, index=0, last=True), 0.6)
        assert out is not None and out.new_token_ids == [1, 2]
        raise RuntimeError("engine failed")
    assert budget.num_sequences == 0
    with pytest.raises(ValueError):
        StreamBudget(-1.0)
