"""The generator interface: `load_generator` on the shipped demo model, `generate`, options and conditions refused by name."""
import json
from pathlib import Path
import numpy as np, pytest, torch
import cxr_diffusion_nbs
from cxr_diffusion_nbs.core import project_root, CXRDataError
from cxr_diffusion_nbs.conditioning import ConditionalDenoiser, ConditioningConfig, model_inputs
from cxr_diffusion_nbs.unet import unet_preset, make_noise_scheduler
from cxr_diffusion_nbs.masks import box_to_mask
from cxr_diffusion_nbs.generators import GENERATOR_KINDS
from cxr_diffusion_nbs.sampling import PixelDiffusionGenerator, SamplingError, load_generator, sample

DEMO = project_root()/'data'/'models'/'cpu64_demo'

@pytest.fixture(scope='module')
def gen(): return cxr_diffusion_nbs.load_generator(DEMO, device='cpu')

def test_top_level_and_registry(gen):
    assert cxr_diffusion_nbs.load_generator is load_generator and 'pixel-diffusion' in GENERATOR_KINDS
    assert (gen.kind, gen.image_size, gen.mask_mode) == ('pixel-diffusion', 64, 'union')
    assert gen.findings == ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly')
    assert gen.conditions == ('labels', 'mask')
    assert set(gen.options) == {'sampler', 'steps', 'eta', 'guidance', 'guidance_mode', 'mixed_precision', 'progress', 'autoguidance',
                               'guidance_interval'}
    with pytest.raises(AttributeError): cxr_diffusion_nbs.no_such_thing

def test_generate_shape_range_and_equals_sample(gen):
    box = box_to_mask((20, 14, 34, 28), (64, 64))
    imgs = gen.generate(findings='nodule', masks=box, seed=[3, 4], steps=4)
    assert imgs.shape == (2, 1, 64, 64) and imgs.dtype == torch.float32 and -1 <= imgs.min() and imgs.max() <= 1
    conds = model_inputs(gen.model, 2, findings='nodule', masks=box)
    rec = {k: gen.defaults[k] for k in ('sampler', 'guidance', 'guidance_mode')}   # what the model recommends (generator.json)
    assert rec['sampler'] == 'dpmpp-sigma-min'                              # chosen in nbs/16a_realness
    assert torch.equal(imgs, sample(gen.model, gen.noise_scheduler, conds, steps=4, seed=[3, 4], **rec).images)
    one = gen.generate(findings='nodule', masks=box, seed=4, steps=4)        # an image depends on its seed alone
    torch.testing.assert_close(one[0], imgs[1], atol=1e-4, rtol=0)

def test_per_image_conditions_and_no_mask_entries(gen):
    m = torch.zeros(5, 64, 64); m[2, 20:34, 14:28] = 1                       # a per-finding mask (mass channel)
    labels = torch.zeros(3, 5); labels[0, 2] = labels[1, 2] = labels[2, 1] = 1
    imgs = gen.generate(labels=labels, masks=[m, None, None], seed=[0, 1, 2], steps=3)
    assert imgs.shape == (3, 1, 64, 64)
    alone = gen.generate(labels=labels[1:2], seed=[1], steps=3)              # None = the model's no-mask input
    torch.testing.assert_close(imgs[1], alone[0], atol=1e-4, rtol=0)
    assert gen.generate(findings=['nodule', ['mass', 'effusion'], ''], steps=2).shape == (3, 1, 64, 64)

@pytest.mark.parametrize('kw,field', [
    (dict(temperature=.7), "'temperature'"), (dict(sampler='euler'), "'sampler'"), (dict(steps=0), "'steps'"),
    (dict(guidance={'text': 2.}), "'text'"), (dict(guidance_mode='joint'), "'guidance_mode'"),
    (dict(findings='hernia'), "'findings'"), (dict(masks=torch.ones(32, 32)), "'masks'"), (dict(text='a nodule'), "'text'"),
    (dict(eta=.5), "'eta'"), (dict(mixed_precision='fp8'), "'mixed_precision'")])
def test_refused_by_name_before_compute(gen, kw, field, monkeypatch):
    calls = []
    monkeypatch.setattr(gen.model, 'forward', lambda *a, **k: calls.append(1))
    kw = dict(dict(findings='nodule', steps=2), **kw)
    with pytest.raises(SamplingError, match=field): gen.generate(**kw)
    assert not calls
    with pytest.raises(SamplingError, match="'temperature'"): gen.check_options(temperature=1)

def test_autoguidance_guide_folder(tmp_path):
    "A weaker model in guide/ is loaded with the generator and named in its provenance; autoguidance without one is refused by name."
    import shutil
    d = tmp_path/'m'
    shutil.copytree(DEMO, d, ignore=shutil.ignore_patterns('guide'))
    shutil.copytree(DEMO, d/'guide', ignore=shutil.ignore_patterns('guide', 'generator.json', 'log.csv'))   # the model as its own guide
    g = load_generator(d, device='cpu')
    assert g.guide is not None and len(g.provenance()['guide_sha256']) == 64
    plain = g.generate(findings='nodule', seed=[1, 2], steps=3, autoguidance=0)
    torch.testing.assert_close(g.generate(findings='nodule', seed=[1, 2], steps=3, autoguidance=2), plain, atol=1e-4, rtol=0)  # D + w (D - D) = D
    shutil.rmtree(d/'guide')
    spec = json.loads((d/'generator.json').read_text())
    spec.setdefault('defaults', {})['autoguidance'] = 2
    (d/'generator.json').write_text(json.dumps(spec))
    with pytest.raises(SamplingError, match="defaults.autoguidance.*weaker model"): load_generator(d, device='cpu')
    with pytest.raises(SamplingError, match="'autoguidance'"): load_generator(DEMO, device='cpu').generate(findings='nodule', steps=2, autoguidance=-1)

def test_guidance_interval_as_a_recommended_default(tmp_path):
    "A generator.json may recommend guiding a condition over part of the schedule; generate uses it unless told, and a bad one is refused on load."
    import shutil
    d = tmp_path/'m'
    shutil.copytree(DEMO, d)
    spec = json.loads((d/'generator.json').read_text())
    spec['defaults']['guidance_interval'] = {'mask': [250, 1000]}
    (d/'generator.json').write_text(json.dumps(spec))
    g, box = load_generator(d, device='cpu'), box_to_mask((20, 14, 34, 28), (64, 64))
    kw = dict(findings='nodule', masks=box, seed=[3, 4], steps=4)
    demo = load_generator(DEMO, device='cpu')
    torch.testing.assert_close(g.generate(**kw), demo.generate(**kw, guidance_interval={'mask': [250, 1000]}), atol=0, rtol=0)
    assert (g.generate(**kw) - demo.generate(**kw)).abs().max() > 1e-3        # it changes the films
    torch.testing.assert_close(g.generate(findings='nodule', seed=[3], steps=4), demo.generate(findings='nodule', seed=[3], steps=4))  # no mask: nothing to limit
    spec['defaults']['guidance_interval'] = {'mask': [800, 200]}
    (d/'generator.json').write_text(json.dumps(spec))
    with pytest.raises(SamplingError, match=r"defaults.guidance_interval.mask"): load_generator(d, device='cpu')
    with pytest.raises(SamplingError, match="'text'"): demo.generate(**kw, guidance_interval={'text': [0, 500]})

def test_a_mask_for_a_model_without_masks():
    torch.manual_seed(0)
    m = ConditionalDenoiser(unet_preset('tiny', image_size=16), ConditioningConfig(mask_mode=None))
    g = PixelDiffusionGenerator(m, make_noise_scheduler(m.unet_cfg))
    assert g.conditions == ('labels',) and g.mask_mode is None and g.image_size == 16
    with pytest.raises(SamplingError, match="'masks'"): g.generate(findings='nodule', masks=torch.ones(16, 16), steps=2)
    with pytest.raises(SamplingError, match="'masks'"): g.generate(findings='nodule', masks=[torch.ones(16, 16), None], steps=2)
    assert g.generate(findings='nodule', steps=2).shape == (1, 1, 16, 16)

def test_provenance_has_no_paths(gen):
    p = gen.provenance()
    assert p['kind'] == 'pixel-diffusion' and len(p['model_sha256']) == 64 and p['checkpoint'] == 'cpu64_demo'
    assert p['defaults']['sampler'] == 'dpmpp-sigma-min' and str(project_root()) not in json.dumps(p)

def test_unknown_kind_and_missing_path(tmp_path):
    with pytest.raises(CXRDataError, match='does not exist'): load_generator(tmp_path/'nope')
    (tmp_path/'flow').mkdir(); (tmp_path/'flow'/'generator.json').write_text(json.dumps({'kind': 'flow-matching'}))   # 'gan' is a kind now (24_gan)
    with pytest.raises(SamplingError, match="'kind'"): load_generator(tmp_path/'flow')

def test_recommended_defaults_are_loaded_and_checked(tmp_path):
    import shutil
    from cxr_diffusion_nbs.checkpoints import recommend_defaults, generator_defaults
    m = tmp_path/'model'; shutil.copytree(DEMO, m)
    recommend_defaults(m, {'guidance': {'labels': 2.5}, 'guidance_mode': 'nested', 'steps': 12}, 'a test')
    assert json.loads((m/'generator.json').read_text())['defaults_why'] == 'a test'
    g = load_generator(m, device='cpu')
    assert g.defaults['guidance'] == {'labels': 2.5} and g.defaults['steps'] == 12 and g.defaults['guidance_mode'] == 'nested'
    assert generator_defaults(m)['steps'] == 12
    a = g.generate(findings='mass', seed=1, steps=2)
    b = g.generate(findings='mass', seed=1, steps=2, guidance={'labels': 2.5})
    c = g.generate(findings='mass', seed=1, steps=2, guidance={})                  # a caller's option wins
    assert torch.equal(a, b) and not torch.equal(a, c)
    for bad, field in (({'guidance': {'text': 2}}, 'defaults.text'), ({'sampler': 'euler'}, 'defaults.sampler'),
                       ({'stepz': 3}, 'defaults.stepz')):
        recommend_defaults(m, bad, 'broken')
        with pytest.raises(SamplingError, match=field) as e: load_generator(m, device='cpu')
        assert 'generator.json' in str(e.value)

def test_non_finite_generator_is_refused_before_drawing(tmp_path, capsys):
    "A model whose weights hold a NaN would draw black images filed as synthetic X-rays: refused naming file and tensor."
    import shutil
    from safetensors.torch import load_file, save_file
    from cxr_diffusion_nbs.checkpoints import CheckpointError
    from cxr_diffusion_nbs.sampling import main as sample_main
    model = tmp_path/'demo'; shutil.copytree(DEMO, model)
    w = model/'ema.safetensors'
    sd = load_file(str(w)); name = sorted(sd)[-1]
    sd[name] = sd[name].clone(); sd[name].view(-1)[-1] = float('inf')
    save_file(sd, str(w))
    with pytest.raises(CheckpointError, match=rf"ema\.safetensors: field '{name}': holds NaN or infinite"):
        load_generator(model, device='cpu')
    with pytest.raises(SystemExit) as e:
        sample_main(['--checkpoint', str(model), '--n', '1', '--steps', '2', '--output', str(tmp_path/'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and name in err and err.count('\n') == 1, err
    assert not (tmp_path/'out').exists()


# ---- a new kind in a few lines: registered, then opened by load_generator, cxr-sample and cxr-cohort ----------------

from cxr_diffusion_nbs.generators import Generator, check_generated, check_kind, image_seeds, register_generator

class Grey(Generator):
    "A test kind: a grey film per finding (brighter with more findings) and seeded speckle; its weights are the levels."
    kind, noun = 'test-grey', 'grey test model'
    findings, image_size = ('pneumothorax', 'nodule', 'mass', 'effusion', 'cardiomegaly'), 64

    @classmethod
    def load(cls, path, device=None):
        check_kind(path, cls)
        return cls(path, Path(path)/'levels.safetensors', dict(mixed_precision='no', progress=False))

    def generate(self, labels=None, masks=None, seed=0, *, findings=None, text=None, n=None, **options):
        self.check_options('generate', **options)
        rows = labels if labels is not None else torch.tensor([[float(f in (r or ())) for f in self.findings] for r in (findings or [()] * (n or 1))])
        seeds = image_seeds(seed, len(rows))
        speckle = torch.stack([torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return check_generated(torch.as_tensor(rows).float().sum(1)[:, None, None, None] / 10 - .5 + .2 * speckle, self.checkpoint)

@pytest.fixture(scope='module')
def grey(tmp_path_factory):
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp('grey')
    save_file({'levels': torch.arange(6.)}, str(d/'levels.safetensors'))
    (d/'generator.json').write_text(json.dumps({'kind': 'test-grey'}))
    register_generator('test-grey', Grey.load, 'grey test model')
    return d

def test_a_new_kind_opens_draws_and_records(grey):
    gen = load_generator(grey)
    assert isinstance(gen, Grey) and cxr_diffusion_nbs.load_generator(grey, device='cpu').kind == 'test-grey'
    assert (gen.takes_sampler, gen.can_guide, gen.can_inpaint, gen.has_latents) == (False, False, False, False)
    x = gen.generate(findings=[['nodule'], []], seed=[4, 5])
    assert x.shape == (2, 1, 64, 64) and torch.equal(gen.generate(findings=[[]], seed=5), x[1:])
    with pytest.raises(SamplingError, match="'steps'.*a grey test model draws in one pass"): gen.generate(steps=20)
    p = gen.provenance()
    assert p['kind'] == 'test-grey' and p['weights'] == 'levels.safetensors' and len(p['model_sha256']) == 64

def test_a_new_kind_through_cxr_sample_and_cxr_cohort(grey, tmp_path):
    from cxr_diffusion_nbs.sampling import main as cxr_sample
    from cxr_diffusion_nbs.cohort import main as cxr_cohort, load_cohort
    from cxr_diffusion_nbs.core import sample_data_root
    cxr_sample(['--checkpoint', str(grey), '--finding', 'mass', '--n', '2', '--output', str(tmp_path/'s')])
    meta = json.loads((tmp_path/'s'/'samples.json').read_text())
    assert meta['kind'] == 'test-grey' and meta['sampler'] is None and len(meta['files']) == 2
    cxr_cohort(['--checkpoint', str(grey), '--output', str(tmp_path/'c'), '--counts', 'nodule=2',
                '--set', f'data_root={sample_data_root()}', '--no-progress'])
    assert len(load_cohort(tmp_path/'c').images) == 2
    assert json.loads((tmp_path/'c'/'cohort.json').read_text())['generator_kind'] == 'test-grey'
    assert 'drawn by a grey test model' in (tmp_path/'c'/'README.md').read_text()

def test_a_loader_must_return_a_generator(tmp_path):
    (tmp_path/'generator.json').write_text(json.dumps({'kind': 'test-not-a-generator'}))
    register_generator('test-not-a-generator', lambda p, device=None: object())
    with pytest.raises(SamplingError, match="returned a object, not a Generator"): load_generator(tmp_path)
    with pytest.raises(SamplingError, match="'loader'"): register_generator('x', 'cxr_diffusion_nbs.gan:GANGenerator.load')
