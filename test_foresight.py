"""tools/foresight.py: its Foresight policy selects by the max of its own and the next steps' scores."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))
from foresight import Foresight, Recorder, teacher_forced  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from policies import RefreshKV, group_max, pool  # noqa: E402
from refreshkv import generate  # noqa: E402


def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                 hidden_dim=96, max_seq_len=160)).eval()


class Checked(Foresight):
    """Foresight that checks each refresh against its definition, computed with policies.py's helpers."""

    def refresh(self, layer, probs, q_raw, last=None, flag=None):
        want = probs
        for u in self.ahead():
            future = self.future.get((u, layer), torch.zeros_like(probs))[:, :probs.shape[1]].clone()
            if last is not None:
                future[:, int(last) + 1:] = 0
            want = torch.maximum(want, future)
        super().refresh(layer, probs, q_raw, last, flag)
        score = pool(group_max(want, self.n_kv))
        if last is not None:
            score[:, int(last) + 1:] = float("-inf")
        kth = score.topk(self.budget, dim=-1).values[:, -1:]
        chosen = self.small[layer]
        assert (chosen >= 0).all() and (score.gather(1, chosen) >= kth).all()  # K positions, each in the top K
        own = pool(group_max(probs, self.n_kv)).gather(1, chosen)
        self.differs = getattr(self, "differs", False) or bool((own < score.gather(1, chosen)).any())


def test_foresight_sees_the_partial_steps_up_to_the_next_full_step():
    f = Foresight(4, 5, {})
    for t, steps in ((1, [2, 3, 4]), (5, [6, 7, 8, 9]), (10, [11, 12, 13, 14])):  # the prefill is t = 1
        f.t = t
        assert list(f.ahead()) == steps


def test_foresight_selects_by_the_next_steps_scores():
    model = tiny_model()
    prompt, gold = torch.randint(0, 64, (90,)).tolist(), torch.randint(0, 64, (30,)).tolist()
    record = Recorder()
    teacher_forced(model, prompt, gold, record)
    assert sorted({t for t, _ in record.scores}) == list(range(2, len(gold) + 1))  # every decode step, every layer
    checked = Checked(12, 5, record.scores)
    teacher_forced(model, prompt, gold, checked)
    assert checked.differs  # the future changed some selection: the case is not trivial


def test_foresight_without_a_future_or_a_layer_is_refreshkv():
    model = tiny_model()
    prompt, gold = torch.randint(0, 64, (90,)).tolist(), torch.randint(0, 64, (30,)).tolist()
    run = lambda policy: torch.stack([lg for _, lg in generate(model, prompt, policy, len(gold), forced=gold)])
    assert torch.equal(run(Foresight(12, 5, {})), run(RefreshKV(12, 5)))
    record = Recorder()
    teacher_forced(model, prompt, gold, record)
    assert torch.equal(run(Foresight(12, 5, record.scores, layers=set())), run(RefreshKV(12, 5)))
    assert not torch.equal(run(Foresight(12, 5, record.scores, layers={1})), run(RefreshKV(12, 5)))
