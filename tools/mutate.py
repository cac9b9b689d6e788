"""Mutation testing of the core modules: plant one named bug at a time in a copy of the package, run the fast tests that
cover it, and report the share of bugs the tests catch (`make mutate`). Each mutation is a realistic mistake, not a
syntax error: a sign, a transpose, a detach, a wrong axis, a weight dropped. A mutation whose text is no longer in its
module is reported as stale, so the list follows the code."""
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T_OT = ['tests/test_ot_exact.py', 'tests/test_ot_ipot.py', 'tests/test_ot_properties.py', 'tests/test_losses.py']
T_CB = ['tests/test_loss_composition.py', 'tests/test_benchmark_faithful.py', 'tests/test_callbacks.py']
T_G = ['tests/test_graph_standins.py', 'tests/test_ot_ipot.py']
T_W = ['tests/test_wkd.py', 'tests/test_loss_composition.py']

# (name, module, text, replacement, tests)
MUTATIONS = [
    ('cost: feature maps not flattened', 'cost.py', 'if x.ndim >= 4: x = x.flatten(-3)', 'if x.ndim >= 5: x = x.flatten(-3)', T_OT),
    ('cost: 1 + cos instead of 1 - cos', 'cost.py', '        return 1 - S\n', '        return 1 + S\n', T_OT),
    ('cost: teacher norms not inverted', 'cost.py', 'rx, ry = nx.clamp_min(eps).reciprocal_(), ny.clamp_min(eps).reciprocal_()',
     'rx, ry = nx.clamp_min(eps).reciprocal_(), ny.clamp_min(eps)', T_OT),
    ('cost: backward sign of the second term', 'cost.py', 'g * (ix.unsqueeze(-1) * ry.unsqueeze(-2)), y, alpha=-1)',
     'g * (ix.unsqueeze(-1) * ry.unsqueeze(-2)), y, alpha=1)', T_OT),
    ('cost: no clamp to [0, 2]', 'cost.py', 'return C.view(*lead, *C.shape[-2:]).clamp(0, 2)', 'return C.view(*lead, *C.shape[-2:])', T_OT),
    ('cost: zero vectors keep a gradient', 'cost.py', 'ix, iy = rx * (nx >= eps), ry * (ny >= eps)', 'ix, iy = rx, ry', T_OT),
    ('exact: plan not divided by n', 'exact.py', 'P[rows, cols] = 1.0 / n', 'P[rows, cols] = 1.0', T_OT),
    ('exact: plan transposed', 'exact.py', "plan = torch.from_numpy(P).reshape(batch + (n, m))",
     "plan = torch.from_numpy(np.ascontiguousarray(np.swapaxes(P, -1, -2))).reshape(batch + (n, m))", T_OT),
    ('exact: weights swapped', 'exact.py', "wa, wb = _weights(a, n, batch, 'a').reshape(-1, n), _weights(b, m, batch, 'b').reshape(-1, m)",
     "wb, wa = _weights(a, n, batch, 'a').reshape(-1, n), _weights(b, m, batch, 'b').reshape(-1, m)", T_OT),
    ('remd: min instead of max of the relaxations', 'remd.py', 'return torch.maximum(row_relaxation(C, check=False), col_relaxation(C, check=False))',
     'return torch.minimum(row_relaxation(C, check=False), col_relaxation(C, check=False))', T_OT),
    ('scatter remd: min instead of max of the relaxations', 'fast.py', '        return torch.maximum(r, c)\n', '        return torch.minimum(r, c)\n', T_OT),
    ('scatter remd: gradient to the losing side', 'fast.py', '        gr = torch.where(r >= c, g, 0)  # the winning side gets the gradient; a tie goes to the rows (a valid subgradient)',
     '        gr = torch.where(r < c, g, 0)', T_OT),
    ('remd: row relaxation over the wrong axis', 'remd.py', 'return check_cost(C, check).amin(-1).mean(-1)', 'return check_cost(C, check).amin(-2).mean(-1)', T_OT),
    ('fused remd: gradient to the losing side', 'fast.py', '        gr = torch.where(r >= c, g, 0)  # the winning side gets the gradient; a tie goes to the rows, as in `scatter_remd`',
     '        gr = torch.where(r < c, g, 0)', T_OT),
    ('ipot: delta and sigma updates swapped', 'fast.py', '            torch.div(a, torch.bmm(sig, Qt, out=dl), out=dl)  # delta = a / (Q sigma)',
     '            torch.div(b, torch.bmm(sig, Qt, out=dl), out=dl)', T_OT),
    ('ipot: kernel not re-applied', 'fast.py', '        if t < n_iter - 1: Q.mul_(K)  # the next Q = K * T', '        pass', T_OT),
    ('ipot: log-domain marginal of the wrong side', 'ipot.py', '            ls = lb - torch.logsumexp(lQ + ld.unsqueeze(-1), -2)',
     '            ls = la[..., :1].expand_as(lb) - torch.logsumexp(lQ + ld.unsqueeze(-1), -2)', T_OT),
    ('ipot: never the log domain', 'ipot.py', 'if log_domain is None: log_domain = beta < LOG_DOMAIN_BELOW.get(C.dtype, 0.05)',
     'if log_domain is None: log_domain = False', T_OT + ['tests/test_graph_standins.py']),
    ('ipot: value without the plan', 'ipot.py', '    return (plan * C).sum((-2, -1)), plan', '    return C.mean((-2, -1)), plan', T_OT),
    ('ipot graph: new input not copied in', 'fast.py', '    sC.copy_(C); sa.copy_(a); sb.copy_(b)', '    sa.copy_(a); sb.copy_(b)', T_G),
    ('ipot graph: output buffer returned', 'fast.py', '    graph.replay()\n    return out.clone()', '    graph.replay()\n    return out', T_G),
    ('ipot graph: cache unbounded', 'fast.py', 'if len(GRAPHS) >= 16: GRAPHS.pop(next(iter(GRAPHS)))', 'pass', T_G),
    ('kd: no T^2', 'losses.py', "return F.kl_div(ls, lt, reduction='batchmean', log_target=True) * self.T ** 2",
     "return F.kl_div(ls, lt, reduction='batchmean', log_target=True)", T_OT + T_CB),
    ('kd: KL the other way', 'losses.py', "return F.kl_div(ls, lt, reduction='batchmean', log_target=True) * self.T ** 2",
     "return F.kl_div(lt, ls, reduction='batchmean', log_target=True) * self.T ** 2", T_OT + T_CB),
    ('ot loss: teacher not detached', 'losses.py', 'outs = [f(x.reshape(x.shape[0], -1), y.detach().reshape(y.shape[0], -1)) for x, y in pairs]',
     'outs = [f(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)) for x, y in pairs]', T_OT),
    ('ot loss: mean over layers', 'losses.py', '        return self.layer_values(student_feats, teacher_feats).sum()',
     '        return self.layer_values(student_feats, teacher_feats).mean()', T_OT + T_CB),
    ('fitnet: teacher and regressed student swapped', 'losses.py', 'return F.mse_loss(_f32(r), _f32(teacher_hint.detach()))',
     'return F.mse_loss(_f32(r), _f32(r.detach()))', T_OT + T_CB),
    ('rkd: distances not normalised by their mean', 'losses.py', '    d = d / (d.sum() / (b * (b - 1))).clamp_min(eps)', '    d = d', T_OT),
    ('rkd: angle weight dropped', 'losses.py', 'return self.w_dist * F.smooth_l1_loss(ds, dt) + self.w_angle * F.smooth_l1_loss(as_, at)',
     'return self.w_dist * F.smooth_l1_loss(ds, dt) + F.smooth_l1_loss(as_, at)', T_OT),
    ('pkt: KL the other way', 'losses.py', 'return (pt * torch.log((pt + self.eps) / (ps + self.eps))).mean()',
     'return (ps * torch.log((ps + self.eps) / (pt + self.eps))).mean()', T_OT),
    ('at: attention over the wrong axis', 'losses.py', 'return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1, eps=eps)',
     'return F.normalize(f.abs().pow(p).mean(-1).flatten(1), dim=1, eps=eps)', T_OT),
    ('sp: Gram rows not normalised', 'losses.py', 'Gs, Gt = F.normalize(s @ s.T, dim=1, eps=self.eps), F.normalize(t @ t.T, dim=1, eps=self.eps)',
     'Gs, Gt = s @ s.T, t @ t.T', T_OT),
    ('cc: neighbouring samples not paired', 'losses.py', '            return (d[:-1] * d[1:]).sum(1).mean()', '            return (d * d).sum(1).mean()', T_OT),
    ('crd: negatives of any class', 'losses.py', '    return order[torch.where(r >= s, r + c, r)]  # skip the anchor\'s own block',
     '    return order[r]', T_OT + T_CB),
    ('crd: memory not updated with momentum', 'losses.py', 'M.index_copy_(0, idx, F.normalize(self.momentum * M[idx] + (1 - self.momentum) * v, dim=1))',
     'M.index_copy_(0, idx, F.normalize(v, dim=1))', T_OT),
    ('crd: noise ratio of one', 'losses.py', '        mPn = (h.shape[1] - 1) / self.n_data', '        mPn = 1 / self.n_data', T_OT),
    ('wkd-l: teacher and student marginals swapped', 'wkd.py', 'P = _sinkhorn_log(-C / self.reg, lt, ls, self.n_iter)[0].exp()',
     'P = _sinkhorn_log(-C / self.reg, ls, lt, self.n_iter)[0].exp()', T_W),
    ('wkd-l: the true class kept', 'wkd.py', 'idx = k + (k >= target.to(s.device).unsqueeze(1)).long()', 'idx = k', T_W),
    ('wkd-f: mean weight ignored', 'wkd.py', 'return self.mean_weight * m + self.cov_weight * c', 'return m + self.cov_weight * c', T_W),
    ('callbacks: WKD target term dropped', 'callbacks.py', "target = wkd_target_loss(s_out, t_out, y) / self.weight if self.weight else 0.",
     "target = 0.", T_CB),
    ('callbacks: term added on validation too', 'callbacks.py', "    order, run_valid = 5, False", "    order, run_valid = 5, True", T_CB),
    ('callbacks: CE weight ignored', 'callbacks.py', '            if sh.ce is not None: learn.loss_grad = sh.ce[1] * learn.loss_grad', '            pass', T_CB),
    ('callbacks: term weight ignored', 'callbacks.py', '        learn.loss_grad = learn.loss_grad + self.weight * term', '        learn.loss_grad = learn.loss_grad + term', T_CB),
    ('callbacks: KD alone weights for combinations', 'callbacks.py', '        self.weight = (0.9 if alone else 1.) if w == \'auto\' else w',
     '        self.weight = 0.9 if w == \'auto\' else w', T_CB),
    ('callbacks: student features detached', 'callbacks.py', "            self.s_hooks = FeatureHooks(self.learn.model, self.s_layers)",
     "            self.s_hooks = FeatureHooks(self.learn.model, self.s_layers, detach=True)", T_CB),
    ('callbacks: small batches not skipped', 'callbacks.py', '        if bs < self.min_batch:', '        if False:', T_CB),
    ('callbacks: probe draws a batch from the loader', 'callbacks.py',
     "        xb = self.inputs(sample_batch(self.learn.dls.train, 2, self._device()))",
     "        xb = self.inputs(tuple(o[:2].to(self._device()) for o in self.learn.dls.train.one_batch()))", T_CB),
    ('callbacks: CRD labels not passed', 'callbacks.py', 'self.T, self.momentum, labels=labels)', 'self.T, self.momentum, labels=None)', T_CB),
    ('callbacks: export keeps the teacher', 'callbacks.py', "        learn.remove_cbs(cbs)\n", "", T_CB),
]

def run(m, pkg_src:Path, work:Path, timeout:int)->str:
    "Plant mutation `m` in a fresh copy of the package under `work`, run its tests: 'caught', 'survived' or 'stale'."
    name, mod, old, new, tests = m
    pkg = work/'otkd_nb'
    if pkg.exists(): shutil.rmtree(pkg)
    shutil.copytree(pkg_src, pkg)
    src = (pkg/mod).read_text()
    if src.count(old) != 1: return 'stale'
    (pkg/mod).write_text(src.replace(old, new))
    env = {**os.environ, 'PYTHONPATH': str(work), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-W', 'ignore', *sorted(set(tests))]
    try: r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired: return 'caught'  # a mutation that hangs the tests is caught by CI's time limit
    return 'survived' if r.returncode == 0 else 'caught'

def main(argv=None)->int:
    p = argparse.ArgumentParser(prog='mutate', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', default=None, help='run the mutations whose name contains this text (default: all)')
    p.add_argument('--timeout', type=int, default=900, help='seconds for the tests of one mutation (default: 900)')
    p.add_argument('--target', type=float, default=0.95, help='the share of mutations that must be caught (default: 0.95)')
    a = p.parse_args(argv)
    ms = [m for m in MUTATIONS if a.only is None or a.only in m[0]]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        shutil.copytree(ROOT/'tests', work/'tests'); shutil.copy(ROOT/'pyproject.toml', work)
        res, t0 = {}, time.time()
        for i, m in enumerate(ms):
            res[m[0]] = run(m, ROOT/'otkd_nb', work, a.timeout)
            print(f"[{i + 1}/{len(ms)}] {res[m[0]]:8s} {m[0]}  ({time.time() - t0:.0f} s)", flush=True)
    stale = [n for n, v in res.items() if v == 'stale']
    live = {n: v for n, v in res.items() if v != 'stale'}
    caught = sum(v == 'caught' for v in live.values())
    share = caught / len(live) if live else 0.
    print(f"\n{caught} of {len(live)} mutations caught ({100 * share:.1f}%, target {100 * a.target:.0f}%)")
    for n, v in live.items():
        if v == 'survived': print(f"  survived: {n}")
    if stale: print(f"stale (text not found; update tools/mutate.py): {stale}")
    return 0 if share >= a.target and not stale else 1

if __name__ == '__main__': sys.exit(main())
