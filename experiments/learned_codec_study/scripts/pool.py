import numpy as np, torch
torch.set_num_threads(1)
from splitnet.model import load_model
from splitnet.codecs import make_codec
from splitnet.model.efficientnet import to_map
d=np.load("/tmp/lc/f15.npz"); bm=load_model("efficientnet-lite0"); tail=bm.stage(15,16).eval()
held=torch.from_numpy(d["held"]); hl=torch.from_numpy(d["held_logits"])
with torch.no_grad():
    h=held
    for i,b in enumerate(tail.blocks): h=b(h,None,None,15+i)
    hd=tail.head; x=hd.act(hd._bn1(hd._conv_head(to_map(h,hd.side)))).mean((2,3))  # (N,1280)
    assert torch.allclose(hd._fc(x),hl,atol=1e-3)
    xn=x.numpy()[:,None,:]
    for name in ("int8","int4"):
        c=make_codec(name); ps=[c.encode(xn[i:i+1]) for i in range(len(xn))]
        nb=np.mean([p.nbytes for p in ps]); dec=np.concatenate([c.decode(p) for p in ps])[:,0]
        out=hd._fc(torch.from_numpy(dec)); lp=hl.log_softmax(-1)
        kl=(lp.exp()*(lp-out.log_softmax(-1))).sum(-1).mean()
        t5=(hl.topk(5).indices[:,:,None]==out.topk(5).indices[:,None,:]).any(-1).float().mean()
        print(name, "bytes", nb, "top1", float((out.argmax(-1)==hl.argmax(-1)).float().mean()), "top5", float(t5), "KL", float(kl))
