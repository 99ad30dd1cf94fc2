import json
import torch
from convsim.modeling.models import load

ref = json.load(open("tools/gpu/parity_ref.json"))
for dtype in (torch.float32, torch.bfloat16):
    m, t = load("gemma-3-270m", device="cuda", dtype=dtype)
    ids = t("[Hello] how are you today?")["input_ids"]
    with torch.no_grad():
        out = m.generate(input_ids=torch.tensor([ids], device="cuda"), max_new_tokens=12, do_sample=False)
        lg = m(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].float()
    print(
        "parity",
        dtype,
        "ids",
        ids == ref["ids"],
        "greedy",
        out[0].tolist() == ref["greedy"],
        "top5",
        lg.topk(5).indices.tolist() == ref["top5"],
        "maxdiff_top5",
        max(abs(a - b) for a, b in zip(lg.topk(5).values.tolist(), ref["top5_logits"])),
    )
