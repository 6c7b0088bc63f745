"""Do the d20 steps have host bubbles? Time K queued steps right after a sync,
and K queued steps launched while the GPU sleeps (host far ahead)."""
import json, os, statistics, sys
import torch
from sparsetrain.benchmark import make_train_step, SPARSE24_OVERRIDES, environment, gpu_clock_monitor

K = 8
preset = sys.argv[1] if len(sys.argv) > 1 else "d20"
extra = {} if preset == "d20" else dict(d_model=4096, n_head=32, n_layer=8)
compile_ = "--eager" not in sys.argv
steps = {}
for name, ov in (("relu2", {"ffn": "relu2"}), ("relu2_24", dict(SPARSE24_OVERRIDES))):
    step, _ = make_train_step("d20", compile=compile_, model_overrides={**ov, **extra})
    for _ in range(5):
        step()
    steps[name] = step
torch.cuda.synchronize()

def run(step, ahead):
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if ahead:
        torch.cuda._sleep(int(1.5e9))  # ~1 s at 1.5 GHz: the host queues all K steps meanwhile
    a.record()
    for _ in range(K):
        step()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / K

res = {n: {"synced_start": [], "host_ahead": []} for n in steps}
for r in range(6):
    for n, s in steps.items():
        for mode in (("synced_start", False), ("host_ahead", True)) if r % 2 else (("host_ahead", True), ("synced_start", False)):
            res[n][mode[0]].append(run(s, mode[1]))
out = {"environment": environment(), "preset": preset, "compile": compile_, "K": K, "runs": res,
       "median": {n: {m: statistics.median(v) for m, v in d.items()} for n, d in res.items()}}
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"host_ahead_{preset}_{'compiled' if compile_ else 'eager'}.json"), "w"), indent=1)
for n, d in out["median"].items():
    print(n, {m: round(v, 2) for m, v in d.items()})
