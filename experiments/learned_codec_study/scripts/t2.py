import numpy as np, torch, time, sys, math
torch.set_num_threads(2); torch.manual_seed(0)
from splitnet.model import load_model
from splitnet.codecs.transform import dct_matrix
from splitnet.codecs import make_codec
from splitnet.codecs.sensitivity import _tail_logits
LAM=float(sys.argv[1]); LR=float(sys.argv[5]); EPOCHS=int(sys.argv[2]); STEP0=float(sys.argv[3]); TRAIN_A=int(sys.argv[4])
d=np.load("/tmp/lc/f15.npz")
bm=load_model("efficientnet-lite0"); tail=bm.stage(15,16).eval()
for p in tail.parameters(): p.requires_grad_(False)
cal=torch.from_numpy(d["cal"]).double(); held=torch.from_numpy(d["held"]).double()
cl=torch.from_numpy(d["cal_logits"]); hl=torch.from_numpy(d["held_logits"])
C=192; T=49; D=torch.from_numpy(dct_matrix(7))
mean=cal.reshape(-1,C).mean(0)
def dct(z): m=z.reshape(z.shape[0],7,7,C); return torch.einsum("ui,vj,nijk->nuvk",D,D,m).reshape(z.shape)
def idct(c): m=c.reshape(c.shape[0],7,7,C); return torch.einsum("ui,vj,nuvk->nijk",D,D,m).reshape(c.shape)
zc=dct(cal-mean); flat=zc.reshape(-1,C); cov=flat.T@flat/flat.shape[0]
ev,evec=torch.linalg.eigh(cov); V=evec.flip(1)
coef=zc@V; rms=coef.pow(2).mean().sqrt()
# per-frequency energy for init: like transform with alpha=1 using coefficient energy? use plain single step
f=np.load("/tmp/lc/fisher.npz")
codec=make_codec("transform",step=STEP0).fit(d["cal"],progress=False,channel_metric=f["cm"],frequency_weights=f["fw"])
mean=torch.from_numpy(codec.mean).double(); V=torch.from_numpy(codec.analysis).double(); VS=torch.from_numpy(codec.synthesis)
coef=dct(cal-mean)@V; STEPS=torch.from_numpy(codec.steps)
cal_c=cal; held_c=held
class Net(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.A0=V.float().clone(); s.S0=VS.float().clone(); s.dA=torch.nn.Parameter(torch.zeros(C,C), requires_grad=bool(TRAIN_A)); s.dS=torch.nn.Parameter(torch.zeros(C,C), requires_grad=bool(TRAIN_A))
        s.logstep=torch.nn.Parameter(STEPS.log().float().clone())
        e=coef.abs().mean(0).float()  # laplace b init per (f,k) in coefficient units
        s.logb=torch.nn.Parameter(torch.log(e/STEPS + 1e-2))
    def forward(s,x,mode):
        z=dct(x.double()-mean).float(); u=(z@(s.A0+s.A0@s.dA))/s.logstep.exp()
        if mode=="noise": uq=u+torch.rand_like(u)-0.5
        elif mode=="ste": uq=u+(torch.round(u)-u).detach()
        else: uq=torch.round(u)
        b=s.logb.exp()
        cdf=lambda v: 0.5+0.5*torch.sign(v)*(1-torch.exp(-v.abs()/b))
        p=(cdf(uq+0.5)-cdf(uq-0.5)).clamp_min(1e-9)
        bits=-torch.log2(p).sum((1,2))
        xh=idct(((uq*s.logstep.exp())@(s.S0+s.dS@s.S0)).double()).float()+mean.float()
        return xh,bits,uq
net=Net(); params=[p for p in net.parameters() if p.requires_grad]; opt=torch.optim.Adam(params,lr=1e-2)
def kl(ref,out):
    lp=ref.log_softmax(-1); return (lp.exp()*(lp-out.log_softmax(-1))).sum(-1)
N=cal.shape[0]; B=32
def evaluate(tag):
  with torch.no_grad():
    res={}
    for name,X,L in (("cal",cal_c,cl),("held",held_c,hl)):
        xh,bits,uq=net(X,"round"); out=tail({"hidden":xh})["logits"]
        a=(out.argmax(-1)==L.argmax(-1)).float().mean(); k=kl(L,out).mean()
        conf=L.softmax(-1).max(-1).values>=0.5; ac=(out.argmax(-1)==L.argmax(-1))[conf].float().mean()
        res[name]=uq
        print(tag,name, "top1",round(float(a),4),"conf",round(float(ac),4),"KL",round(float(k),5),"model bytes",round(float(bits.mean())/8,1), flush=True)
    yc,yh=res["cal"].reshape(N,-1),res["held"].reshape(held.shape[0],-1)
    lo=-int(max(yc.abs().max(),1)); H=0
    vc=(yc.clamp(lo,-lo)-lo).long(); vh=(yh.clamp(lo,-lo)-lo).long(); n=-2*lo+1
    for j in range(vc.shape[1]):
        cnt=torch.bincount(vc[:,j],minlength=n).double()+1/n; p=cnt/cnt.sum(); H+=float(-torch.log2(p[vh[:,j]]).sum())
    print(tag,"held empirical bytes/img (cal hist per coef)", round(H/8/held.shape[0],1), flush=True)
evaluate("init")
t=time.time()
for ep in range(EPOCHS):
    perm=torch.randperm(N); tot=[0,0]
    for g in opt.param_groups: g["lr"]=LR*0.5*(1+math.cos(math.pi*ep/EPOCHS))
    for i in range(0,N,B):
        idx=perm[i:i+B]; x=cal_c[idx]
        xh,bits,_=net(x,"ste")
        out=_tail_logits(tail,xh)
        l_kl=kl(cl[idx],out).mean()
        loss=l_kl+LAM*bits.mean()/1000
        opt.zero_grad(); loss.backward(); opt.step()
        tot[0]+=float(l_kl.detach())*len(idx); tot[1]+=float(bits.mean().detach())*len(idx)/8
    print(ep, [round(v/N,4) for v in tot], round(time.time()-t), flush=True)
    if ep%3==2: evaluate(f"ep{ep}")
evaluate("final")
