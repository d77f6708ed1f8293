import threading, traceback, time
from rdmamig_verbs import VerbsBackend
from rdmamig.caps import Capability as C
b=VerbsBackend()
l=b.listen(host='10.0.2.15', port=0, supported=C(0x30001))
print('listening', l.address, flush=True)
res={}
def acc():
    try: res['d']=l.accept(timeout=10)
    except Exception as e: traceback.print_exc(); res['e']=e
t=threading.Thread(target=acc); t.start()
try:
    s=b.connect(host='10.0.2.15', port=l.address[1], requested=C(0x30001), timeout=10)
    print('connected', s.capabilities, flush=True)
except Exception as e:
    traceback.print_exc()
t.join(); print(res, flush=True)
