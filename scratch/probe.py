import torch, triton, json, os, sys
from triton.testing import do_bench
from bittern import packing, quant
from bittern.kernels import packed as P, quantizers, matmul
torch.manual_seed(0)
dev="cuda"
res={}
def bench(fn): return do_bench(fn, warmup=25, rep=100)
for (n,k) in [(2560,2560),(640,2560),(6912,2560),(2560,6912)]:
    codes=torch.randint(-1,2,(n,k),dtype=torch.int8,device=dev); s=torch.tensor([0.02],device=dev)
    w=packing.pack_ternary_rows(codes)
    dense=(codes.to(torch.bfloat16)*0.02)
    for m in [1,16]:
        x=torch.randn(m,k,device=dev,dtype=torch.bfloat16)
        r={}
        r["bf16"]=bench(lambda: torch.nn.functional.linear(x,dense))
        r["quant+int8fwd(unpacked)"]=bench(lambda: matmul.int8_ternary_linear(*quantizers.quantize_activations(x),codes,s,None,torch.bfloat16))
        r["actquant"]=bench(lambda: quantizers.quantize_activations(x))
        r["tuned"]=bench(lambda: P.skinny_linear(x,w,n,s,None,torch.bfloat16))
        for br in (16,32,64):
            for bk in (128,256,512):
                for sp in (1,4):
                    for nw in (4,):
                        cfg={"BR":br,"BK":bk,"SPLIT":sp,"num_warps":nw}
                        try: r[str(cfg)]=bench(lambda: P.skinny_linear(x,w,n,s,None,torch.bfloat16,config=cfg))
                        except Exception as e: r[str(cfg)]=repr(e)[:80]
        for br in (8,16,32):
            for bk in (128,256):
                for sp in (1,4):
                    cfg={"BR":br,"BK":bk,"SPLIT":sp,"num_warps":4}
                    try: r["gemv"+str(cfg)]=bench(lambda: P.gemv_linear(x,w,n,s,None,torch.bfloat16,cfg))
                    except Exception as e: r["gemv"+str(cfg)]=repr(e)[:80]
        res[f"{m}x{n}x{k}"]=r
        bestg=min((v,kk) for kk,v in r.items() if isinstance(v,float) and kk.startswith("gemv"))
        print("   gemv best", bestg[0]*1e3, bestg[1])
        best=min((v,kk) for kk,v in r.items() if isinstance(v,float) and kk.startswith("{"))
        print(f"M={m} N={n} K={k}: bf16 {r['bf16']*1e3:.1f}us int8fwd {r['quant+int8fwd(unpacked)']*1e3:.1f}us actq {r['actquant']*1e3:.1f} tuned {r['tuned']*1e3:.1f}us best {best[0]*1e3:.1f}us {best[1]}", flush=True)
# profile prefill
for (n,k) in [(2560,2560),(6912,2560)]:
    codes=torch.randint(-1,2,(n,k),dtype=torch.int8,device=dev); s=torch.tensor([0.02],device=dev)
    w=packing.pack_ternary_rows(codes); dense=(codes.to(torch.bfloat16)*0.02)
    for m in [512,4096]:
        x=torch.randn(m,k,device=dev,dtype=torch.bfloat16)
        xq,a=quantizers.quantize_activations(x)
        b1=bench(lambda: torch.nn.functional.linear(x,dense)); b2=bench(lambda: matmul.int8_ternary_linear(xq,a,codes,s,None,torch.bfloat16)); b3=bench(lambda: P.prefill_linear(x,w,n,s,None,torch.bfloat16)); b4=bench(lambda: quantizers.quantize_activations(x))
        print(f"prefill M={m} N={n} K={k}: bf16 {b1*1e3:.1f}us int8fwd(unpacked) {b2*1e3:.1f}us packed(q+gemm) {b3*1e3:.1f}us actq {b4*1e3:.1f}us", flush=True)
json.dump(res,open(os.environ.get("OUT",".")+"/probe.json","w"),indent=1)
