import sys, torch, argparse
sys.path.insert(0, "benchmarks")
import decode as D
from bittern.engine import Engine
args = D.parse_args(["--batch-sizes", "1"])
device = torch.device("cuda")
config = D.model_config(args)
model = D.build_ternary_model(config, device, torch.bfloat16, 0)
engine = Engine(model, None, max_batch=1, max_seq_len=384)
prompt = torch.randint(0, config.vocab_size, (1, 128)).to(device)
engine.generate_ids(prompt.tolist(), max_new_tokens=8, ignore_eos=True)
step = engine._decode_step()
g = next(iter(step.graphs.values()))
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        g.graph.replay()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
