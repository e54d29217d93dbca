import numpy as np, torch
torch.set_num_threads(2)
from splitnet.model import load_model
d=np.load("/tmp/lc/f15.npz"); bm=load_model("efficientnet-lite0"); tail=bm.stage(15,16).eval()
cal=torch.from_numpy(d["cal"]); held=torch.from_numpy(d["held"]); hl=torch.from_numpy(d["held_logits"])
C=192; mu=cal.reshape(-1,C).mean(0); sd=cal.reshape(-1,C).std(0)+1e-6
z=((cal.reshape(-1,C)-mu)/sd); ev,evec=torch.linalg.eigh(z.T@z/z.shape[0])
print("var explained", [round(float(ev[-k:].sum()/ev.sum()),3) for k in (16,32,64,96,128)])
def kl(ref,out):
    lp=ref.log_softmax(-1); return (lp.exp()*(lp-out.log_softmax(-1))).sum(-1)
with torch.no_grad():
  for k in (16,32,64,96,128,192):
    v=evec[:,-k:]; zh=(((held-mu)/sd)@v)@v.T*sd+mu
    out=tail({"hidden":zh})["logits"]
    print(k, float((out.argmax(-1)==hl.argmax(-1)).float().mean()), float(kl(hl,out).mean()))
