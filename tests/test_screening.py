"""Screening: the score prefers what was asked, the screened generator keeps the best candidate and nothing else."""
from types import SimpleNamespace
import numpy as np, pytest, torch
from torch import nn
from cxr_diffusion_nbs.condition_fidelity import Judges
from cxr_diffusion_nbs.screening import ScreeningError, ScreenedGenerator, candidate_seeds, screen_scores

S = 16

class Brightness(nn.Module):
    "A 'classifier' whose finding 0 is a bright image and finding 1 a dark one."
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.tensor(10.))
    def forward(self, x): m = x.mean((1, 2, 3)); return torch.stack([self.w * m, -self.w * m], 1)

class BrightPixels(nn.Module):
    "A 'segmenter' that calls every bright pixel a lesion."
    levels = 1
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.tensor(10.))
    def forward(self, x): return self.w * x

def judges():
    return Judges(Brightness(), SimpleNamespace(findings=('mass', 'effusion'), image_size=S),
                  BrightPixels(), SimpleNamespace(image_size=S), name='toy judges')

def test_score_prefers_the_asked_findings_and_place():
    j = judges()
    bright, dark = torch.full((1, 1, S, S), .5), torch.full((1, 1, S, S), -.5)
    x = torch.cat([bright, dark])
    s_mass = screen_scores(j, x, [[1, 0], [1, 0]], ['mass', 'effusion'])
    s_eff = screen_scores(j, x, [[0, 1], [0, 1]], ['mass', 'effusion'])
    assert s_mass[0] > s_mass[1] and s_eff[1] > s_eff[0]
    m = torch.zeros(2, 1, S, S); m[:, :, 4:8, 4:8] = 1
    here, there = -torch.ones(1, 1, S, S), -torch.ones(1, 1, S, S)
    here[..., 4:8, 4:8] = 1; there[..., 10:14, 10:14] = 1
    s = screen_scores(j, torch.cat([here, there]), [[1, 0], [1, 0]], ['mass', 'effusion'], m)
    assert s[0] - s[1] == pytest.approx(1.0, abs=1e-4)       # same brightness; Dice 1 against Dice 0
    no_mask = screen_scores(j, torch.cat([here, there]), [[1, 0], [1, 0]], ['mass', 'effusion'], torch.zeros(2, 1, S, S))
    assert no_mask[0] == pytest.approx(no_mask[1])          # an empty mask asks for no place
    with pytest.raises(ScreeningError, match="'nodule'"): screen_scores(j, x, [[1], [1]], ['nodule'])
    with pytest.raises(ScreeningError, match='labels'): screen_scores(j, x, [[1, 0]], ['mass', 'effusion'])

class SeedBrightness:
    "A 'generator' whose image brightness is a function of its seed."
    kind, findings, image_size, conditions, mask_mode = 'toy', ('mass', 'effusion'), S, ('labels',), None
    options, defaults, checkpoint = ('steps',), {'steps': 1}, None
    def inputs(self, labels=None, masks=None, *, findings=None, text=None, n=None, where='generate'):
        return {'labels': torch.as_tensor(labels).float()}
    def generate(self, labels=None, masks=None, seed=0, *, findings=None, text=None, n=None, **options):
        v = torch.tensor([((int(s) * 7919) % 1000) / 1000 - .5 for s in seed])
        return v[:, None, None, None].expand(len(seed), 1, S, S).clone()
    def provenance(self): return dict(kind=self.kind)
    def model_sha256(self): return 'toy'

def test_screened_generator_keeps_the_best_candidate():
    gen, j = SeedBrightness(), judges()
    lab = torch.tensor([[1., 0], [0, 1], [1, 0]])
    seeds = [3, 4, 5]
    plain = gen.generate(lab, seed=seeds)
    torch.testing.assert_close(ScreenedGenerator(gen, j, candidates=1).generate(lab, seed=seeds), plain)
    sg = ScreenedGenerator(gen, j, candidates=6)
    kept = sg.generate(lab, seed=seeds)
    cand = candidate_seeds(seeds, 6)
    assert (cand[:, 0] == seeds).all() and len(set(cand.ravel())) == cand.size
    every = torch.stack([gen.generate(lab, seed=list(cand[:, c])) for c in range(6)], 1)
    b, v = kept[:, 0, 0, 0], every[:, :, 0, 0, 0]
    assert b[0] == v[0].max() and b[1] == v[1].min() and b[2] == v[2].max()     # bright for mass, dark for effusion
    assert sg.last_scores.shape == (3, 6) and (sg.last_scores.max(1) >= sg.last_scores[:, 0]).all()
    assert sg.provenance()['screening'] == dict(judges='toy judges', candidates=6, mask_weight=1.0)
    assert sg.kind == 'toy+screened' and sg.findings == gen.findings
    torch.testing.assert_close(sg.generate(lab, seed=seeds), kept)             # reproducible
    with pytest.raises(ScreeningError, match='candidates'): ScreenedGenerator(gen, j, candidates=0)
    other = SeedBrightness(); other.findings = ('nodule',)
    with pytest.raises(ScreeningError, match="'nodule'"): ScreenedGenerator(other, j)
