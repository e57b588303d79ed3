"""Compare two report.json files of the same recipe (e.g. the demo before and after a code change):
stage outputs (model hashes), perplexities and task scores must be identical; the paired speedups are
printed side by side (they are measurements, not expected to repeat exactly).

    python benchmarks/demo_compare.py OLD/report.json NEW/report.json
"""
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def entries(r):
    return {e['name'].split(' ')[0]: e for e in [r['baseline'], *r['artifacts']]}
ea, eb = entries(a), entries(b)
same = True
for name in ea:
    for eng in ea[name]['engines']:
        x, y = ea[name]['engines'][eng], eb[name]['engines'][eng]
        for key in ('model_hash',):
            if x.get(key) != y.get(key):
                same = False; print('DIFF', name, eng, key, x.get(key), y.get(key))
        px = (x.get('perplexity') or {}).get('perplexity'); py = (y.get('perplexity') or {}).get('perplexity')
        tx = json.dumps(x.get('tasks'), sort_keys=True, default=str); ty = json.dumps(y.get('tasks'), sort_keys=True, default=str)
        print(f"{name:14s} {eng:5s} ppl {px} vs {py} {'same' if px == py else 'DIFF'}; tasks {'same' if tx == ty else 'DIFF'}")
        same &= px == py and tx == ty
    for eng, ret in (ea[name].get('retention') or {}).items():
        for which, r in ((sys.argv[1], ret), (sys.argv[2], eb[name]['retention'][eng])):
            sp = r.get('speed') or {}
            print('   ', eng, ' | '.join(f"{k} {v['ratio']:.2f}x ({v['lo']:.2f}-{v['hi']:.2f}) {v['verdict']}" for k, v in sp.items()), '<-', which.split('/')[-2])
print('IDENTICAL accuracy and hashes' if same else 'DIFFERENT')
