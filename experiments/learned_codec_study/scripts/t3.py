import numpy as np, torch, time, sys, math
torch.set_num_threads(2); torch.manual_seed(0)
from splitnet.model import load_model
from splitnet.codecs import make_codec
from splitnet.codecs.sensitivity import output_fisher, _tail_logits
STEP=float(sys.argv[1]); EPOCHS=int(sys.argv[2]); HID=int(sys.argv[3]); LR=float(sys.argv[4]); WD=float(sys.argv[5])
d=np.load("/tmp/lc/f15.npz"); bm=load_model("efficientnet-lite0"); tail=bm.stage(15,16).eval()
for p in tail.parameters(): p.requires_grad_(False)
cal,held=d["cal"],d["held"]
import os
if os.path.exists("/tmp/lc/fisher.npz"):
    f=np.load("/tmp/lc/fisher.npz"); cm,fw=f["cm"],f["fw"]
else:
    sens=output_fisher(bm,15,cal,samples=4,seed=0); cm,fw=sens.channel_metric,sens.frequency_weights; np.savez("/tmp/lc/fisher.npz",cm=cm,fw=fw)
torch.set_grad_enabled(True)
codec=make_codec("transform",step=STEP).fit(cal,progress=False,channel_metric=cm,frequency_weights=fw)
def rt(X):
    q=codec.levels(X); return codec._reconstruct(q.astype(np.float32)).reshape(X.shape).astype(np.float32)
t=time.time(); calh=torch.from_numpy(rt(cal)); heldh=torch.from_numpy(rt(held)); print("rt",round(time.time()-t,1))
nb=np.mean([codec.encode(held[i:i+1]).nbytes for i in range(0,484,4)]); print("bytes ~",nb)
cl=torch.from_numpy(d["cal_logits"]); hl=torch.from_numpy(d["held_logits"])
C=192; sd=torch.from_numpy(cal.reshape(-1,C).std(0))+1e-6; mu=torch.from_numpy(cal.reshape(-1,C).mean(0))
class Corr(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.l1=torch.nn.Linear(2*C,HID); s.l2=torch.nn.Linear(HID,C)
        torch.nn.init.zeros_(s.l2.weight); torch.nn.init.zeros_(s.l2.bias)
    def forward(s,x):
        z=(x-mu)/sd; g=z.mean(1,keepdim=True).expand_as(z)
        return x+s.l2(torch.relu(s.l1(torch.cat([z,g],-1))))*sd
net=Corr(); opt=torch.optim.AdamW(net.parameters(),lr=LR,weight_decay=WD)
def kl(ref,out):
    lp=ref.log_softmax(-1); return (lp.exp()*(lp-out.log_softmax(-1))).sum(-1)
def ev(tag):
  with torch.no_grad():
    for name,X,L in (("cal",calh,cl),("held",heldh,hl)):
        out=tail({"hidden":net(X)})["logits"]; a=(out.argmax(-1)==L.argmax(-1)).float().mean(); k=kl(L,out).mean()
        conf=L.softmax(-1).max(-1).values>=0.5; ac=(out.argmax(-1)==L.argmax(-1))[conf].float().mean()
        t5=(L.topk(5).indices[:,:,None]==out.topk(5).indices[:,None,:]).any(-1).float().mean()
        print(tag,name,"top1",round(float(a),4),"conf",round(float(ac),4),"top5",round(float(t5),4),"KL",round(float(k),5),flush=True)
ev("init"); N=cal.shape[0]; B=32; t=time.time()
for ep in range(EPOCHS):
    for g in opt.param_groups: g["lr"]=LR*0.5*(1+math.cos(math.pi*ep/EPOCHS))
    perm=torch.randperm(N)
    for i in range(0,N,B):
        idx=perm[i:i+B]; out=_tail_logits(tail,net(calh[idx])); loss=kl(cl[idx],out).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    if ep%4==3 or ep==EPOCHS-1: print(ep, round(time.time()-t)); ev(f"ep{ep}")
