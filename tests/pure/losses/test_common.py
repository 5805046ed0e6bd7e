import torch

from pure import rng
from pure.losses.common import completion_logps
from pure.models.llama import forward, init
from pure.train import make_apply
from tests.tiny import TINY

CONFIG = TINY


def test_completion_logps_equals_full_logits_gather():
    params = init(CONFIG, rng.key(0))
    ids = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, 7:] = -100  # padding of the last row
    got = completion_logps(make_apply(CONFIG, params)({}), {"input_ids": ids, "labels": labels})
    lp = torch.log_softmax(forward(params, ids, CONFIG).logits.double(), -1)
    want = torch.zeros(3, dtype=torch.float64)
    for r in range(3):
        for t in range(8):
            if labels[r, t + 1] != -100:
                want[r] += lp[r, t, ids[r, t + 1]]
    # fp32 forward vs float64 log_softmax of the same logits: 1e-5
    torch.testing.assert_close(got["logps"].double(), want, atol=1e-5, rtol=0)
    assert got["tokens"].tolist() == [5, 5, 3]
    ref = completion_logps(make_apply(CONFIG, params)({}), {"input_ids": ids, "labels": labels}, reference=True)
    torch.testing.assert_close(ref["logps"], got["logps"])
