"""Where conversion time goes: the same HF -> fused EP=8 conversion with all sha256 work, without the per-tensor
source hashes, and with no hashing at all (hash objects replaced by no-ops, for measurement only).

    PYTHONPATH=. python benchmarks/convert_hash_cost.py
"""
import os
import sys
import time
import shutil
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_adapters.convert as C
from moe_adapters import execute
src='/tmp/moe-adapters-bench/qwen3-30b-shape-2L'
if not os.path.exists(src):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); from convert_speed import build_qwen3_30b_shape; build_qwen3_30b_shape(src, 2)
def run(label):
    shutil.rmtree('/tmp/xo', ignore_errors=True); os.system('sync')
    t=time.time(); C.convert(src,'/tmp/xo',ep=8); print(label, round(time.time()-t,2))
run('full')
orig=execute.SourceTensorHashes.feed
execute.SourceTensorHashes.feed=lambda self,*a: None
run('no source hash')
execute.SourceTensorHashes.feed=orig
import hashlib
class H:
    def update(self,b): pass
    def hexdigest(self): return '0'*64
real=hashlib.sha256
execute.hashlib.sha256=lambda *a: H()
run('no hashing at all')
execute.hashlib.sha256=real
