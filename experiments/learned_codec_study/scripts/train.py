import numpy as np, torch, time, sys, math
torch.set_num_threads(2); torch.manual_seed(0)
from splitnet.model import load_model
K=int(sys.argv[1]); LAM=float(sys.argv[2]); EPOCHS=int(sys.argv[3]); HID=int(sys.argv[4]) if len(sys.argv)>4 else 0; GAIN=float(sys.argv[5]) if len(sys.argv)>5 else 4.0
d=np.load("/tmp/lc/f15.npz")
bm=load_model("efficientnet-lite0"); tail=bm.stage(15,16).eval()
for p in tail.parameters(): p.requires_grad_(False)
cal=torch.from_numpy(d["cal"]); held=torch.from_numpy(d["held"])
cl=torch.from_numpy(d["cal_logits"]); hl=torch.from_numpy(d["held_logits"])
C=192; mu=cal.reshape(-1,C).mean(0); sd=cal.reshape(-1,C).std(0)+1e-6
class Net(torch.nn.Module):
    def __init__(s):
        super().__init__()
        if HID:
            s.enc=torch.nn.Sequential(torch.nn.Linear(C,HID),torch.nn.ReLU(),torch.nn.Linear(HID,K))
            s.dec=torch.nn.Sequential(torch.nn.Linear(K,HID),torch.nn.ReLU(),torch.nn.Linear(HID,C))
        else:
            s.enc=torch.nn.Linear(C,K); s.dec=torch.nn.Linear(K,C)
        s.logb=torch.nn.Parameter(torch.zeros(K)+math.log(3.0))
        z=((cal.reshape(-1,C)-mu)/sd); ev,evec=torch.linalg.eigh(z.T@z/z.shape[0]); v=evec[:,-K:].flip(1); g=GAIN/ev[-K:].flip(0).sqrt()
        if not HID:
            with torch.no_grad():
                s.enc.weight.copy_((v*g).T); s.enc.bias.zero_(); s.dec.weight.copy_(v/g); s.dec.bias.zero_()
    def forward(s,x,mode):
        y=s.enc((x-mu)/sd)
        if mode=="noise": yq=y+torch.rand_like(y)-0.5
        elif mode=="ste": yq=y+(torch.round(y)-y).detach()
        else: yq=torch.round(y)
        b=s.logb.exp()
        cdf=lambda v: 0.5+0.5*torch.sign(v)*(1-torch.exp(-v.abs()/b))
        p=(cdf(yq+0.5)-cdf(yq-0.5)).clamp_min(1e-9)
        bits=-torch.log2(p).sum((1,2))
        return s.dec(yq)*sd+mu, bits, yq
net=Net(); opt=torch.optim.Adam(net.parameters(),lr=2e-3)
def kl(ref,out):
    lp=ref.log_softmax(-1); return (lp.exp()*(lp-out.log_softmax(-1))).sum(-1)
N=cal.shape[0]; B=32; steps=EPOCHS*math.ceil(N/B); sched=torch.optim.lr_scheduler.OneCycleLR(opt,2e-3,total_steps=steps)
t=time.time()
for ep in range(EPOCHS):
    perm=torch.randperm(N); tot=[0,0,0]
    for i in range(0,N,B):
        idx=perm[i:i+B]; x=cal[idx]
        xh,bits,_=net(x,"noise" if ep<EPOCHS//2 else "ste")
        out=tail({"hidden":xh})["logits"]
        l_kl=kl(cl[idx],out).mean(); l_mse=(((xh-x)/sd)**2).mean()
        loss=l_kl+0.05*l_mse+LAM*bits.mean()/1000
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        tot[0]+=float(l_kl)*len(idx); tot[1]+=float(bits.mean())*len(idx)/8; tot[2]+=float(l_mse)*len(idx)
    if ep%5==4 or ep==EPOCHS-1: print(ep, [round(v/N,4) for v in tot], round(time.time()-t), flush=True)
with torch.no_grad():
    for name,X,L in (("cal",cal,cl),("held",held,hl)):
        xh,bits,yq=net(X,"round"); out=tail({"hidden":xh})["logits"]
        a=(out.argmax(-1)==L.argmax(-1)).float().mean(); k=kl(L,out).mean()
        conf=L.softmax(-1).max(-1).values>=0.5; ac=(out.argmax(-1)==L.argmax(-1))[conf].float().mean()
        # empirical entropy with per-latent histograms from cal
        print(name, "top1",round(float(a),4),"conf",round(float(ac),4),"KL",round(float(k),5),"model bytes",round(float(bits.mean())/8,1), "maxabs", float(yq.abs().max()))
    _,_,yc=net(cal,"round"); _,_,yh=net(held,"round")
    H=0
    for j in range(K):
        lo=int(min(yc[...,j].min(),yh[...,j].min())); vc=(yc[...,j]-lo).long().flatten(); vh=(yh[...,j]-lo).long().flatten()
        n=int(max(vc.max(),vh.max()))+1; cnt=torch.bincount(vc,minlength=n).double()+0.5; p=cnt/cnt.sum()
        H+=float(-torch.log2(p[vh]).sum())
    print("held empirical bytes/img (cal hist)", round(H/8/held.shape[0],1))
torch.save(net.state_dict(), f"/tmp/lc/net_{K}_{LAM}_{HID}.pt")
