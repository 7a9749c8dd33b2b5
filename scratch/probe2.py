import torch, triton, json, os
from triton.testing import do_bench_cudagraph
from bittern import packing, quant
from bittern.kernels import packed as P, quantizers, matmul
torch.manual_seed(0)
dev="cuda"
def bench(fn):
    fn(); fn(); torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50)*1e3
out={}
for (n,k) in [(2560,2560),(640,2560),(6912,2560),(2560,6912)]:
    codes=torch.randint(-1,2,(n,k),dtype=torch.int8,device=dev); s=torch.tensor([0.02],device=dev)
    w=packing.pack_ternary_rows(codes); dense=(codes.to(torch.bfloat16)*0.02)
    for m in [1,4,16]:
        x=torch.randn(m,k,device=dev,dtype=torch.bfloat16)
        ref=quant.integer_linear(x,codes,s,None,torch.bfloat16)
        r={"bf16":bench(lambda: torch.nn.functional.linear(x,dense))}
        r["skinny-tuned"]=bench(lambda: P.skinny_linear(x,w,n,s,None,torch.bfloat16))
        r["quant+unpacked-int8"]=bench(lambda: matmul.int8_ternary_linear(*quantizers.quantize_activations(x),codes,s,None,torch.bfloat16))
        for br in (1,2,4,8,16):
            for bkw in (64,128,256):
                for nw in (2,4,8):
                    cfg={"BR":br,"BKW":bkw,"num_warps":nw}
                    try:
                        y=P.gemv4_linear(x,w,n,s,None,torch.bfloat16,cfg)
                        assert torch.equal(y,ref), "MISMATCH"
                        r["gemv4"+str(cfg)]=bench(lambda: P.gemv4_linear(x,w,n,s,None,torch.bfloat16,cfg))
                    except Exception as e: r["gemv4"+str(cfg)]=repr(e)[:100]
        g=min((v,kk) for kk,v in r.items() if isinstance(v,float) and kk.startswith("gemv4"))
        errs=[kk for kk,v in r.items() if isinstance(v,str)]
        print(f"M={m} N={n} K={k}: bf16 {r['bf16']:.1f}us skinny {r['skinny-tuned']:.1f} q+int8 {r['quant+unpacked-int8']:.1f} gemv4 best {g[0]:.1f} {g[1]} errors {len(errs)} {r[errs[0]] if errs else ''}", flush=True)
        out[f"{m}x{n}x{k}"]=r
    for m in [512,4096]:
        x=torch.randn(m,k,device=dev,dtype=torch.bfloat16)
        assert torch.equal(P.prefill2_linear(x,w,n,s,None,torch.bfloat16), quant.integer_linear(x,codes,s,None,torch.bfloat16))
        r={"bf16":bench(lambda: torch.nn.functional.linear(x,dense)),
           "prefill-fields":bench(lambda: P.prefill_linear(x,w,n,s,None,torch.bfloat16)),
           "prefill-unpack":bench(lambda: P.prefill2_linear(x,w,n,s,None,torch.bfloat16)),
           "unpack":bench(lambda: P.unpack(w,n)),
           "actq":bench(lambda: quantizers.quantize_activations(x))}
        print(f"M={m} N={n} K={k}: "+" ".join(f"{a} {b:.1f}" for a,b in r.items()), flush=True)
        out[f"{m}x{n}x{k}"]=r
json.dump(out,open(os.environ.get("OUT",".")+"/probe2.json","w"),indent=1)
