"""The rarity study: capping, training sets of every arm, scores, verdicts, and a small resumable run (bundled sample)."""
import dataclasses, json
import numpy as np, pandas as pd, pytest, torch
from cxr_diffusion_nbs.core import ConfigError, project_root, sample_data_root
from cxr_diffusion_nbs.manifest import load_shared_subset
from cxr_diffusion_nbs.rarity import (RarityConfig, RarityError, StudySet, cap_positives, sensitivity_at_specificity, _holm,
                                      verdict, arm_training_set, augmented_positives, take_per_finding, train_arm,
                                      real_sets, run_study, study_table, load_predictions, summary_markdown, main,
                                      _pools_needed, paired_mean_change, primary_endpoint, worth_table, endpoint_line)
from cxr_diffusion_nbs.sampling import load_generator

F5 = ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')

def _set(n, labels, synthetic=0, target=None):
    facts = pd.DataFrame(dict(image_id=[f'i{k}' for k in range(n)], patient_id=[f'p{k}' for k in range(n)], group='',
                              synthetic=synthetic, source='x'))
    if target is not None: facts['target'] = target
    return StudySet(torch.rand(n, 1, 16, 16) * 2 - 1, np.asarray(labels, float), np.ones(n), facts)

def test_cap_keeps_at_most_k_and_all_negatives():
    rng = np.random.default_rng(0)
    lab = (rng.random((300, 5)) < .15).astype(float); lab[rng.random((300, 5)) < .05] = np.nan
    for k in (1, 5, 20):
        keep = cap_positives(lab, k, seed=3)
        assert (np.nan_to_num(lab[keep]) == 1).sum(0).max() <= k
        assert keep[(np.nan_to_num(lab) != 1).all(1)].all()
    assert (cap_positives(lab, 5, 1) == cap_positives(lab, 5, 1)).all()
    assert (cap_positives(lab, 5, 1) != cap_positives(lab, 5, 2)).any()

def test_config_refusals():
    with pytest.raises(ConfigError, match='real-only'): RarityConfig(n_synthetic=(10,))
    with pytest.raises(ConfigError, match="'augmnt'"): RarityConfig(arms=('augmnt',))
    with pytest.raises(ConfigError, match='arm_n'): RarityConfig(n_synthetic=(0, 10), arm_n=20)
    with pytest.raises(ConfigError, match='specificity'): RarityConfig(specificity=1.0)
    with pytest.raises(ConfigError, match="'ks'.*>= 0"): RarityConfig(ks=(-1, 20))
    with pytest.raises(ConfigError, match="'ks'.*needs a k >= 1 beside it"): RarityConfig(ks=(0,))
    assert RarityConfig(ks=(0, 5, 50)).donor_k == 5 and RarityConfig(ks=(0, 5, 50)).primary_comparison()[0] == 5
    c = RarityConfig.from_dict({'ks': '20, 50', 'n_synthetic': [0, 50, 100], 'arms': ['mix', 'pretrain'], 'seeds': [0, 1]})
    runs = c.runs()
    assert runs[0] == (20, 'real-only', 0, 0) and (50, 'pretrain', 100, 1) in runs and (50, 'pretrain', 50, 1) not in runs
    assert len(runs) == 2 * 2 * (1 + 2 + 1)

def test_scores_and_verdicts():
    y = np.r_[np.zeros(10), np.ones(5)]
    assert sensitivity_at_specificity(y, np.r_[np.arange(10) / 10, [.95, .99, .1, .2, .92]], .8) == pytest.approx(.6)
    assert np.isnan(sensitivity_at_specificity(np.zeros(4), np.arange(4.), .8))
    adj = _holm(np.array([.01, .04, np.nan, .03]))
    assert adj[0] == pytest.approx(.03) and adj[1] == pytest.approx(.06) and np.isnan(adj[2]) and adj[3] == pytest.approx(.06)
    assert verdict(.1, .01, 25, 20) == 'gain' and verdict(-.1, .01, 25, 20) == 'loss'
    assert verdict(.1, .2, 25, 20) == 'no significant difference' and verdict(.3, .001, 8, 20).startswith('too few to conclude')

def test_arm_training_sets():
    cfg = RarityConfig(findings=F5, n_synthetic=(0, 2, 4), arms=('mix', 'unconditional', 'augment', 'pretrain', 'weighted', 'negatives'))
    train = _set(10, np.eye(5)[np.arange(10) % 5])
    tgt = np.repeat(F5, 4)
    cond = _set(20, np.eye(5)[np.repeat(np.arange(5), 4)], 1, tgt)
    cond.labels[:, 1] = np.nan                                    # a finding the generator does not model: unknown
    pools = dict(conditional=cond, unconditional=_set(20, cond.labels, 1, tgt), negative=_set(20, np.zeros((20, 5)), 1))
    mix, _ = arm_training_set('mix', 2, train, pools, cfg, 0)
    assert len(mix) == 10 + 2 * 5 and np.isnan(mix.labels[10:, 1]).all()
    w, _ = arm_training_set('weighted', 4, train, pools, cfg, 0)
    assert (w.weights[10:] == .5).all() and (w.weights[:10] == 1).all()
    neg, _ = arm_training_set('negatives', 4, train, pools, cfg, 0)
    assert len(neg) == 10 + 20 + 20
    real, pre = arm_training_set('pretrain', 4, train, pools, cfg, 0)
    assert real is train and len(pre) == 20
    aug, _ = arm_training_set('augment', 3, train, pools, cfg, 0)
    assert len(aug) == 10 + 3 * 5 and (aug.facts.synthetic == 0).all()
    assert arm_training_set('mix', 0, train, pools, cfg, 0)[0] is train
    assert len(take_per_finding(cond, 1)) == 5
    scr = _set(20, cond.labels, 1, tgt); pools['screened'] = scr
    sc, _ = arm_training_set('screened', 2, train, pools, cfg, 0)
    assert len(sc) == 10 + 2 * 5
    from_pool = lambda pool: [any(torch.equal(x, y) for y in pool.images) for x in sc.images[10:]]
    assert all(from_pool(scr)) and not any(from_pool(cond))          # the screened arm draws on the screened pool only
    assert _pools_needed(dataclasses.replace(cfg, arms=('screened',)))['screened'] == 4
    with pytest.raises(ConfigError, match='screen_candidates'): RarityConfig(screen_candidates=1)

def test_train_arm_learns_a_visible_finding():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(160, 1, 32, 32, generator=g) * .2 - .6
    y = np.zeros((160, 1)); y[::2, 0] = 1
    x[::2, :, 10:22, 10:22] += 1.                                 # positives carry a bright square
    s = StudySet(x, y, np.ones(160), pd.DataFrame(dict(image_id=range(160))))
    cfg = RarityConfig(findings=('nodule',), image_size=32, width=4, epochs=3, batch_size=32, device='cpu')
    from cxr_diffusion_nbs.classifier import predict_proba
    from cxr_diffusion_nbs.downstream import auroc
    p = predict_proba(train_arm(s, cfg, 0), x)[:, 0]
    assert auroc(y[:, 0], p) > .9

def test_small_study_runs_resumes_and_refuses(tmp_path, monkeypatch):
    monkeypatch.setenv('CXR_NO_SHARED', '1')
    real = load_shared_subset(sample_data_root())
    gen = load_generator(project_root()/'data'/'models'/'cpu64_demo')
    cfg = RarityConfig(ks=(5,), n_synthetic=(0, 2), arms=('mix', 'unconditional', 'negatives'), seeds=(0,), epochs=1,
                       width=4, n_boot=20, steps=2, device='cpu')
    m, train, test = real_sets(real, cfg)
    assert not set(train.facts.patient_id) & set(test.facts.patient_id)
    out = run_study(gen, real, cfg, tmp_path/'s', progress=False)
    preds, facts = load_predictions(out)
    assert sorted(preds) == sorted(cfg.runs()) and all(p.shape == (len(facts), 5) for p in preds.values())
    before = {f.name: f.stat().st_mtime_ns for f in (out/'predictions').iterdir()}
    run_study(gen, real, cfg, out, progress=False)                # resumed: nothing retrained
    assert before == {f.name: f.stat().st_mtime_ns for f in (out/'predictions').iterdir()}
    more = dataclasses.replace(cfg, seeds=(0, 1))                 # extended with a seed: only the new runs
    run_study(gen, real, more, out, progress=False)
    assert len(list((out/'predictions').iterdir())) == len(more.runs())
    with pytest.raises(RarityError, match='width'): run_study(gen, real, dataclasses.replace(cfg, width=8), out, progress=False)
    pools = sorted(f.name for f in (out/'pools').iterdir())
    zero = dataclasses.replace(more, ks=(0, 5))                   # k = 0: no real positive, the synthetic ones alone (TSTR)
    run_study(gen, real, zero, out, progress=False)
    assert sorted(f.name for f in (out/'pools').iterdir()) == pools          # the same pools: k = 5's donors drew them
    t0 = study_table(out, zero)
    assert {0, 5} == set(t0.k) and (t0[(t0.k == 0) & (t0.arm == 'real-only')].test_pos > 0).all()
    assert zero.primary_comparison()[0] == 5 and zero.donor_k == 5
    t = study_table(out, more)
    assert {'test', 'test AP', 'test PA'} <= set(t.eval_set) and set(t.arm) == {'real-only', 'mix', 'unconditional', 'negatives'}
    assert t[t.arm != 'real-only'].verdict.str.startswith('too few').all()   # the bundled sample cannot conclude
    assert '| k | arm |' in summary_markdown(t, more)
    r = primary_endpoint(out, more, n_boot=50)                    # the declared comparison: mix at k = 5, n = 2, both seeds
    assert (r['k'], r['arm'], r['n'], r['seeds']) == (5, 'mix', 2, [0, 1]) and r['lo'] <= r['hi']
    assert 'primary' in json.loads((out/'study.json').read_text())
    with pytest.raises(RarityError, match="'primary'"):         # declared when the study started: not changed afterwards
        run_study(gen, real, dataclasses.replace(more, primary={'arm': 'negatives'}), out, progress=False)

def test_paired_mean_change_keeps_patients_and_findings_together():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 2)) < .3).astype(float)
    ref = y + rng.normal(0, 1.5, y.shape)
    better = y + rng.normal(0, .4, y.shape)
    patients = np.repeat(np.arange(100), 2)
    r = paired_mean_change(y, better, ref, patients, n_boot=200)
    assert 0 < r['lo'] < r['mean'] < r['hi'] and r['p'] < .05 and r['mde'] > 0 and r['n_boot_used'] == 200
    flat = paired_mean_change(y, ref, ref, patients, n_boot=50)
    assert flat['mean'] == flat['lo'] == flat['hi'] == 0 and flat['p'] == 1
    y2 = y.copy(); y2[:, 1] = 0                                   # a finding with no test positive is left out of the mean
    r2 = paired_mean_change(y2, better, ref, patients, n_boot=50)
    assert list(r2['findings_used']) == [True, False] and np.isnan(r2['per_finding'][1])
    with pytest.raises(RarityError, match='both classes'): paired_mean_change(np.zeros((10, 1)), np.zeros((10, 1)), np.zeros((10, 1)), np.arange(10))

def test_worth_reads_only_inside_the_curve():
    t = pd.DataFrame(dict(eval_set='test', k=[5, 20, 80, 20, 20], arm=['real-only'] * 3 + ['mix', 'augment'], n=[0, 0, 0, 100, 100],
                          finding='a', auroc=[.6, .7, .8, .75, .65]))
    w = worth_table(t).set_index('arm')
    assert abs(w.loc['mix', 'real_equivalent_k'] - 40) < 1e-9 and abs(w.loc['mix', 'worth_real_positives'] - 20) < 1e-9
    assert abs(w.loc['augment', 'worth_real_positives'] - (10 - 20)) < 1e-9     # below its own k: worth negative
    assert np.isnan(worth_table(t.assign(auroc=[.6, .7, .8, .9, .65])).set_index('arm').loc['mix', 'real_equivalent_k'])
    assert np.isnan(worth_table(t.assign(auroc=[.6, .8, .7, .75, .65])).set_index('arm').loc['mix', 'real_equivalent_k'])  # no rising curve

def test_cli_refuses_bad_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: main(['--output', str(tmp_path/'x'), '--set', 'arms=[mixx]', '--no-progress'])
    assert e.value.code == 2 and "mixx" in capsys.readouterr().err

def test_cli_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys, monkeypatch):
    import cxr_diffusion_nbs.sampling as S
    monkeypatch.setattr(S, 'load_generator', lambda *a, **k: pytest.fail('the generator was loaded before the output was checked'))
    f = tmp_path/'study'; f.write_text('x')
    with pytest.raises(SystemExit) as e: main(['--output', str(f), '--no-progress'])
    assert e.value.code == 2 and "'--output': is a file, not a folder" in capsys.readouterr().err

def test_cli_refuses_a_folder_of_other_files(tmp_path, capsys):
    o = tmp_path/'mine'; o.mkdir(); (o/'thesis.docx').write_text('x')
    with pytest.raises(SystemExit) as e: main(['--output', str(o), '--no-progress'])
    assert e.value.code == 2 and 'holds files that no rarity study wrote' in capsys.readouterr().err
    assert sorted(p.name for p in o.iterdir()) == ['thesis.docx']

# what `_identity` records for a default study of the shipped demo (a study with these fields resumes): since issue 23
# the sampler and guidance mode the demo's generator.json recommends, and its recommended guidance scales (None)
DEFAULT_IDENTITY_CONFIG = {'findings': list(F5), 'test_fraction': 0.25, 'image_size': 64, 'width': 16, 'epochs': 8,
                           'batch_size': 64, 'lr': 0.003, 'synthetic_weight': 0.5, 'report_by': 'view', 'train_where': {},
                           'sampler': 'dpmpp-sigma-min', 'steps': 20, 'guidance': None, 'guidance_mode': 'nested',
                           'sample_batch': 32, 'mixed_precision': 'no'}

def test_default_study_keeps_its_identity_and_a_gan_study_claims_no_sampler():
    from cxr_diffusion_nbs.rarity import _identity, study_sampling, synthetic_pool, capped_manifest
    real = load_shared_subset(sample_data_root())
    demo = load_generator(project_root()/'data'/'models'/'cpu64_demo')
    assert _identity(demo, study_sampling(RarityConfig(), demo), real, None)['config'] == DEFAULT_IDENTITY_CONFIG
    gan = load_generator(project_root()/'data'/'models'/'gan64')
    cfg = study_sampling(RarityConfig(n_synthetic=(0, 2), seeds=(0,)), gan)
    assert (cfg.sampler, cfg.steps, cfg.guidance_mode) == (None, None, None)
    with pytest.raises(RarityError, match="field 'arms'.*'unconditional'"): study_sampling(RarityConfig(arms=('mix', 'unconditional')), gan)
    with pytest.raises(RarityError, match="field 'steps'.*diffusion option"): study_sampling(RarityConfig(steps=20), gan)
    m, train, _ = real_sets(real, cfg)
    pool = synthetic_pool(gan, capped_manifest(m, train.facts.image_id), cfg, 2, 'conditional')      # one pass per image: a second
    assert pool.images.shape == (10, 1, 64, 64) and (np.nan_to_num(pool.labels).sum(0) >= 2).all()


# ---- lesion insertion (issue 24, item 1): the plan, the three edit pools, their arms, the edit detector ----
from cxr_diffusion_nbs.rarity import (EDIT_KINDS, EDIT_ARMS, BOX_COLUMNS, insertion_plan, edited_pool, edit_boxes, slot_move,
                                      edit_realness, region_crops, blank_boxes, real_vs_synthetic, capped_manifest, study_sampling,
                                      synthetic_pool, _identity)
from cxr_diffusion_nbs.cohort import DonorPool
from cxr_diffusion_nbs.inpainting import lesion_region, blend_alpha

TINY_INSERT = dict(insert_steps=2, insert_jump=1, insert_resample=1, guidance={})   # a 2-step RePaint, one pass a step

def test_insert_settings_are_checked_naming_the_field():
    for kw, field in [(dict(insert_feather=3), 'insert_feather'), (dict(insert_dilate=1, insert_feather=2), 'insert_feather'),
                      (dict(insert_steps=0), 'insert_steps'), (dict(insert_jump=20), 'insert_jump'),
                      (dict(insert_resample=True), 'insert_resample'), (dict(insert_dilate=-1), 'insert_dilate')]:
        with pytest.raises(ConfigError, match=f"'{field}'"): RarityConfig(**kw)
    c = RarityConfig.from_dict({'insert_steps': '30', 'insert_jump': 10, 'insert_resample': 1, 'arms': ['insert', 'copy-paste', 'healthy']})
    assert c.insert_steps == 30 and RarityConfig(insert_jump=20, insert_resample=1).insert_jump == 20   # no resampling: any jump
    import yaml
    shipped = RarityConfig.from_dict(yaml.safe_load((project_root()/'configs'/'rarity_insert.yaml').read_text()), 'rarity_insert.yaml')
    assert shipped.primary_comparison() == (20, 'insert', 100) and set(EDIT_ARMS) <= set(shipped.arms)
    need = lambda *arms: _pools_needed(RarityConfig(arms=arms, n_synthetic=(0, 3)))
    assert need('insert') == {'inserted': 3, 'healthy': 3} and need('copy-paste') == {'pasted': 3, 'healthy': 3}
    assert need('healthy') == {'healthy': 3} and need('mix', 'insert')['conditional'] == 3

def _edit_set(kind, slots, targets, labels):
    facts = pd.DataFrame(dict(image_id=[f'{kind}_{s}' for s in slots], patient_id='p', group='', synthetic=1, source=kind,
                              target=targets, slot=slots, recipient=[f'r{s}' for s in slots]))
    return StudySet(torch.rand(len(slots), 1, 16, 16), np.asarray(labels, float), np.ones(len(slots)), facts)

def test_edit_arms_have_the_stated_composition():
    cfg = RarityConfig(findings=F5, n_synthetic=(0, 2), arms=EDIT_ARMS)
    train = _set(10, np.eye(5)[np.arange(10) % 5])
    slots = [f'{f}_{j:05d}' for f in F5 for j in range(3)]
    tg = [s.split('_')[0] for s in slots]
    pos, neg = np.eye(5)[np.repeat(np.arange(5), 3)], np.zeros((15, 5))
    neg[0, 3] = 1                                                  # a recipient with another finding keeps it
    pools = dict(inserted=_edit_set('inserted', slots, tg, pos + neg), healthy=_edit_set('healthy', slots, tg, neg),
                 pasted=_edit_set('pasted', slots, tg, pos + neg))
    ins, pre = arm_training_set('insert', 2, train, pools, cfg, 0)
    assert pre is None and len(ins) == 10 + 2 * 5 + 2 * 5
    src = ins.facts.source.tolist()
    assert src[10:20] == ['inserted'] * 10 and src[20:] == ['healthy'] * 10
    assert list(ins.facts.slot[10:20]) == list(ins.facts.slot[20:])                  # every positive has its healthy twin
    assert (ins.labels[10:20].sum(1) >= 1).all() and ins.labels[20:, :3].sum() == 0 and ins.labels[20, 3] == 1
    cp, _ = arm_training_set('copy-paste', 2, train, pools, cfg, 0)
    assert cp.facts.source.tolist()[10:] == ['pasted'] * 10 + ['healthy'] * 10
    h, _ = arm_training_set('healthy', 2, train, pools, cfg, 0)
    assert len(h) == 20 and (h.facts.source[10:] == 'healthy').all()
    assert [h.labels[10 + i, F5.index(t)] for i, t in enumerate(h.facts.target[10:])] == [1.] * 10   # labelled positive
    assert pools['healthy'].labels[:, :3].sum() == 0                                   # (the pool itself untouched)
    pools['pasted'] = _edit_set('pasted', slots[::-1], tg[::-1], pos)                   # not twins: refused
    with pytest.raises(RarityError, match="'copy-paste'.*not twins"): arm_training_set('copy-paste', 2, train, pools, cfg, 0)

def test_a_generator_that_cannot_inpaint_refuses_the_edit_arms_before_any_work(tmp_path):
    gan = load_generator(project_root()/'data'/'models'/'gan64')
    assert not gan.can_inpaint
    for arm in EDIT_ARMS:
        with pytest.raises(RarityError, match=f"field 'arms'.*'{arm}'"): study_sampling(RarityConfig(arms=('mix', arm)), gan)
    with pytest.raises(RarityError, match="'arms'.*'healthy'"): synthetic_pool(gan, None, RarityConfig(), 2, 'healthy')
    with pytest.raises(RarityError, match="'arms'"): run_study(gan, None, RarityConfig(arms=('insert',)), tmp_path/'s', progress=False)
    assert not (tmp_path/'s').exists()                              # refused before the folder was made

@pytest.fixture(scope='module')
def insertion():
    "The 64-px demo, the bundled sample capped at k = 5, its donor pool and a plan of 2 slots for nodule and effusion."
    torch.set_num_threads(1)
    gen = load_generator(project_root()/'data'/'models'/'cpu64_demo')
    cfg = RarityConfig(findings=('nodule', 'effusion'), device='cpu', **TINY_INSERT)
    m, train, _ = real_sets(load_shared_subset(sample_data_root()), cfg)
    mk = capped_manifest(m, train.facts.image_id[cap_positives(train.labels, 5, 0)])
    pool = DonorPool(mk, gen.findings, gen.image_size)
    return gen, cfg, mk, pool, insertion_plan(pool, cfg.findings, 2, seed=7)

def test_edit_pools_are_counterfactual_twins(insertion):
    gen, cfg, mk, pool, plan = insertion
    assert len(plan) == 4 and list(plan.target) == ['nodule'] * 2 + ['effusion'] * 2
    assert insertion_plan(pool, ('effusion',), 1, seed=7).slot.tolist() == ['effusion_00000']          # slot j: not a function of n
    assert insertion_plan(pool, ('effusion',), 1, seed=7).recipient[0] == plan.recipient[2]
    im = pool.ds.images.set_index('image_id')
    k = pool.findings.index('nodule')
    assert (im.loc[plan.recipient[:2], 'nodule'] == 0).all() and not pool.has_mask[plan.recipient_index[:2], k].any()
    assert pool.has_mask[plan.donor_index[:2], k].all() and (pool.labels[plan.donor_index[:2], k] == 1).all()   # outlined positives
    pools = {k: edited_pool(gen, mk, cfg, 2, k, plan=plan, pool=pool) for k in EDIT_KINDS}
    for k, p in pools.items():
        assert p.images.shape == (4, 1, 64, 64) and p.labels.shape == (4, 2) and (p.facts.source == {'inserted': 'synthetic inserted',
               'healthy': 'synthetic healthy', 'pasted': 'pasted real'}[k]).all()
        for col in ('slot', 'recipient', 'donor', 'seed', 'jitter', *BOX_COLUMNS):      # twins: one plan, one region
            assert list(p.facts[col]) == list(pools['inserted'].facts[col]), (k, col)
    own = mk.images.set_index('image_id').loc[plan.recipient, ['nodule', 'effusion']].to_numpy(float)
    assert np.array_equal(pools['healthy'].labels, own)                                # the recipient's own labels
    hot = own.copy(); hot[[0, 1, 2, 3], [0, 0, 1, 1]] = 1
    assert np.array_equal(pools['inserted'].labels, hot) and np.array_equal(pools['pasted'].labels, hot)
    for i, (_, row) in enumerate(plan.iterrows()):
        film = torch.from_numpy(pool.ds.load(int(row.recipient_index))[0])[None] * 2 - 1
        donor, mask = slot_move(pool, row)
        region = lesion_region(mask, cfg.insert_dilate)[0] > .5
        for k, p in pools.items(): assert torch.equal(p.images[i, 0][~region], film[0][~region]), k   # outside: the recipient
        ys, xs = torch.nonzero(mask[0] > .5, as_tuple=True)
        cy, cx = divmod(int(blend_alpha(mask[0], 8).argmax()), 64)                       # the mask's deepest pixel: its centre
        assert mask[0, cy, cx] == 1 and pools['pasted'].images[i, 0, cy, cx] == donor[0, cy, cx]    # the donor's pixel there
        assert not torch.equal(pools['pasted'].images[i, 0][mask[0] > .5], film[0][mask[0] > .5])   # (not the recipient's)
        y0, x0, y1, x1 = edit_boxes(pools['pasted'])[i] * 64
        assert (ys.min() >= y0 and xs.min() >= x0 and ys.max() < y1 and xs.max() < x1)              # the box holds the lesion
    assert (pools['inserted'].images - pools['healthy'].images).abs().sum() > 0     # the finding asked or not: they differ
    still = plan.assign(jitter=json.dumps(dict(angle=0., scale=1., tx=0., ty=0.)))[:1]                 # unmoved: the donor's own pixels
    pasted = edited_pool(gen, mk, cfg, 1, 'pasted', plan=still, pool=pool)
    row = still.iloc[0]
    dfilm = torch.from_numpy(pool.ds.load(int(row.donor_index))[0]) * 2 - 1
    dmask = pool.masks(int(row.donor_index))[pool.findings.index('nodule')] > .5
    assert dmask.any() and torch.equal(pasted.images[0, 0][dmask], dfilm[dmask])

def test_real_vs_synthetic_keeps_groups_in_one_half(monkeypatch):
    import cxr_diffusion_nbs.rarity as R
    seen = {}
    def fake_train(data, cfg, seed):                              # records which synthetic films it was trained on
        seen['train'] = data.images[data.labels[:, 0] == 1, 0, 0, 0]
        return None
    def fake_predict(model, x):
        seen['test'] = x[:, 0, 0, 0]
        return np.linspace(0, 1, len(x))[:, None]
    monkeypatch.setattr(R, 'train_arm', fake_train); monkeypatch.setattr(R, 'predict_proba', fake_predict)
    groups = np.repeat(np.arange(12), 3)                          # 12 recipient films, 3 edits each
    syn = StudySet(torch.as_tensor(groups, dtype=torch.float32)[:, None, None, None].expand(36, 1, 4, 4).clone(), np.zeros((36, 1)),
                   np.ones(36), pd.DataFrame(dict(image_id=range(36))))
    real = StudySet(torch.full((40, 1, 4, 4), -1.), np.zeros((40, 1)), np.ones(40), pd.DataFrame(dict(image_id=range(40))))
    r = real_vs_synthetic(real, syn, RarityConfig(), seed=3, groups=groups)
    train_groups, test_groups = set(seen['train'].tolist()), set(seen['test'].tolist()) - {-1.}
    assert train_groups and test_groups and not train_groups & test_groups and r['images_per_class'] == 36 - 3 * len(train_groups)
    with pytest.raises(RarityError, match='split'): real_vs_synthetic(real, syn.take(range(3)), RarityConfig(), groups=[0, 0, 0])

def test_edit_detector_sees_the_edit_inside_and_not_outside():
    g = torch.Generator().manual_seed(0)
    real = StudySet(torch.rand(120, 1, 32, 32, generator=g) * .4 - .2, np.zeros((120, 1)), np.ones(120), pd.DataFrame(dict(image_id=range(120))))
    ed = torch.rand(120, 1, 32, 32, generator=g) * .4 - .2
    boxes = np.tile([[.25, .25, .5, .5]], (120, 1)) + np.random.default_rng(0).integers(0, 4, (120, 1)) / 16
    for x, (a, b, _, _) in zip(ed, (boxes * 32).astype(int)): x[:, a:a + 8, b:b + 8] += .6
    edited = StudySet(ed, np.zeros((120, 1)), np.ones(120), pd.DataFrame(dict(image_id=range(120), recipient=np.arange(120) // 2)))
    blank = blank_boxes(ed, boxes, 0.)
    a, b = (boxes[5] * 32).astype(int)[:2]
    assert (blank[5, 0, a:a + 8, b:b + 8] == 0).all() and torch.equal(blank[5, 0, :a], ed[5, 0, :a])
    assert region_crops(ed, boxes, 16).shape == (120, 1, 16, 16)
    r = edit_realness(real, edited, RarityConfig(findings=('nodule',), width=4, epochs=8, batch_size=32, device='cpu'), boxes, crop=16)
    assert set(r) == {'whole', 'inside', 'outside'}
    assert r['whole']['auroc'] > .8 and r['inside']['auroc'] > .8 and r['outside']['auroc'] < .75, r

def test_insert_study_runs_writes_edit_realness_and_refuses_a_changed_insert_setting(tmp_path, monkeypatch):
    monkeypatch.setenv('CXR_NO_SHARED', '1')
    torch.set_num_threads(1)
    real = load_shared_subset(sample_data_root())
    gen = load_generator(project_root()/'data'/'models'/'cpu64_demo')
    cfg = RarityConfig(findings=('nodule', 'effusion'), ks=(5,), n_synthetic=(0, 2), arms=EDIT_ARMS, seeds=(0,), epochs=1,
                       width=4, n_boot=20, device='cpu', **TINY_INSERT)
    assert 'insert_steps' in _identity(gen, cfg, real, None)['config']            # set away from its default: part of the identity
    out = run_study(gen, real, cfg, tmp_path/'s', progress=False)
    assert sorted(p.name for p in (out/'pools').glob('*.safetensors')) == [f'donors_k5_seed0_{k}_n2.safetensors' for k in ('healthy', 'inserted', 'pasted')]
    preds, facts = load_predictions(out)
    assert sorted(preds) == sorted(cfg.runs())
    runs = pd.read_csv(out/'runs.csv').set_index('arm')
    assert runs.loc['insert', 'train_total'] == runs.loc['insert', 'train_real'] + 2 * 2 * 2      # + inserted + their healthy twins
    assert runs.loc['healthy', 'train_total'] == runs.loc['healthy', 'train_real'] + 2 * 2
    er = json.loads((out/'edit_realness.json').read_text())
    assert set(er) == set(EDIT_KINDS) and all(set(v) == {'whole', 'inside', 'outside'} for v in er.values())
    with pytest.raises(RarityError, match="'insert_steps'"):
        run_study(gen, real, dataclasses.replace(cfg, insert_steps=3), out, progress=False)
    with pytest.raises(RarityError, match="'insert_feather'"):
        run_study(gen, real, dataclasses.replace(cfg, insert_feather=1), out, progress=False)

def test_a_killed_pool_draw_resumes_at_its_batch(tmp_path):
    from cxr_diffusion_nbs.rarity import draw_in_parts
    plan = pd.DataFrame(dict(seed=range(7)))
    calls = []
    def draw(rows, fail_at=None):
        calls.append(int(rows['seed'].iloc[0]))
        if fail_at is not None and calls[-1] == fail_at: raise KeyboardInterrupt   # a kill mid-pool
        return dict(x=torch.tensor(rows['seed'].to_numpy(), dtype=torch.float32)[:, None] * 2)
    whole = draw_in_parts(plan, 3, draw)
    assert whole['x'].flatten().tolist() == [2. * s for s in range(7)] and calls == [0, 3, 6]
    calls.clear()
    with pytest.raises(KeyboardInterrupt): draw_in_parts(plan, 3, lambda r: draw(r, fail_at=3), tmp_path/'parts')
    assert len(list((tmp_path/'parts').glob('rows_*.safetensors'))) == 1      # the first batch kept, nothing half-written
    calls.clear(); seen = []
    again = draw_in_parts(plan, 3, draw, tmp_path/'parts', progress=lambda d, t: seen.append((d, t)))
    assert calls == [3, 6] and seen == [(3, 7), (6, 7), (7, 7)]               # only the batches not yet stored
    assert torch.equal(again['x'], whole['x'])
    assert draw_in_parts(plan.iloc[:0], 3, draw) == {}


def test_a_drawn_pool_is_returned_as_stored(tmp_path):
    "A study that draws a pool and one that resumes from it train on the same numbers (images stored at half precision)."
    from cxr_diffusion_nbs.rarity import _stored_set
    drawn = StudySet(torch.rand(3, 1, 8, 8) * 2 - 1, np.zeros((3, 5)), np.ones(3), pd.DataFrame(dict(image_id=['a', 'b', 'c'])))
    first = _stored_set(tmp_path/'pool.safetensors', lambda parts, tick: drawn)
    again = _stored_set(tmp_path/'pool.safetensors', lambda parts, tick: pytest.fail('a stored pool is drawn again'))
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, drawn.images)
    assert torch.allclose(first.images, drawn.images, atol=1e-3) and list(first.facts.image_id) == ['a', 'b', 'c']
