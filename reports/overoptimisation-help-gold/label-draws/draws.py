"""How draws.json was made: each draw-K/summary.json (scripts/overoptimisation.py REPORT_ONLY=1 on
that draw's best-of-n rescoring) and each proxy's summary.json from scripts/gold_labelled_proxy.py
(LABEL_SEED=K; draw 0 is the plain 300-pair run), read into one row per draw. Run from the repo root
with the runs/ folders of 2026-11-28 present:  python reports/overoptimisation-help-gold/label-draws/draws.py
"""
import json
from pathlib import Path
rows = []
agree = {0: 'runs/ooh/proxy-300/summary.json', **{k: f'runs/ooh/p300-s{k}/summary.json' for k in (1, 2, 3, 4)}}
def ci(d, e): return f"{d:+.3f} [{d-1.96*e:+.3f}, {d+1.96*e:+.3f}]"
for k in range(5):
    p = Path(f'reports/overoptimisation-help-gold/label-draws/draw-{k}/summary.json')
    if not p.is_file(): continue
    s = json.loads(p.read_text()); b = s['best_of_n']; cur = b['curves']; summ = b['summary']
    a = json.loads(Path(agree[k]).read_text()); d = a['proxy_final_metrics']['dev_results']['gold-dev']
    m0 = summ['member:0']
    peak_i = max(range(len(cur['member:0'])), key=lambda i: cur['member:0'][i]['gold_reward'])
    fell_members = [m for m in range(5) if summ[f'member:{m}']['gold_fell_while_proxy_rose']]
    members64 = [cur[f'member:{m}'][-1]['gold_reward'] for m in range(5)]
    line = {'draw': k, 'flipped': a['train']['flipped'], 'agreement': round(d['accuracy'], 3),
            'pairwise': round(d['ensemble']['pairwise_agreement'], 2),
            'm0_peak': f"{m0['gold_peak']:.3f} (n={cur['member:0'][peak_i]['n']})", 'm0_end': round(m0['gold_end'], 3),
            'm0_fell': (m0['gold_fell_while_proxy_rose'], round(m0['gold_drop_from_peak'], 3), round(m0['gold_drop_from_peak_sem'], 3)),
            'members_fell': fell_members, 'avg_member_64': round(sum(members64) / 5, 3), 'best_member_64': round(max(members64), 3)}
    for r in ('mean', 'min', 'mean_minus_var'):
        at_peak = cur[r][peak_i]; end = cur[r][-1]
        line[r] = {'at_m0_peak': ci(at_peak['gold_minus_first'], at_peak['gold_minus_first_sem']) if peak_i else 'n=1',
                   'at_64': ci(end['gold_minus_first'], end['gold_minus_first_sem']), 'gold_64': round(end['gold_reward'], 3),
                   'fell': (summ[r]['gold_fell_while_proxy_rose'], round(summ[r]['gold_drop_from_peak'], 3))}
    rows.append(line)
for r in rows: print(json.dumps(r))
json.dump(rows, open('reports/overoptimisation-help-gold/label-draws/draws.json', 'w'), indent=2)
