import numpy as np, torch, time, sys
torch.set_num_threads(2)
from splitnet.bench import photos as P
from splitnet.bench.vision import _cut_pass
from splitnet.model import load_model
from tqdm import tqdm
bm = load_model("efficientnet-lite0")
crops = P.photo_crops(per_source=90, seed=0)
cal, held = P.split_crops(crops, held_out_fraction=0.25, seed=0)
print(len(cal), len(held))
t=time.time()
bar = tqdm(total=len(cal)+len(held))
hm, hl = _cut_pass(bm, [15], held, 32, bar, keep_refs=True)
cm, cl = _cut_pass(bm, [15], cal, 32, bar, keep_refs=True)
np.savez("/tmp/lc/f15.npz", held=hm[15], held_logits=hl.numpy(), cal=cm[15], cal_logits=cl.numpy())
print(time.time()-t, hm[15].shape)
