"""The classifier's shared pieces: the config layer, `fit` (the loop the segmenter uses too), `save_model_folder` /
`load_model_folder` (safetensors + JSON, float16 option) and the shipped classifier, which must keep loading."""
import json
import numpy as np, pytest, torch
from torch import nn
import torch.nn.functional as F
from safetensors.torch import load_file
from cxr_diffusion_nbs.core import ConfigError, project_root
from cxr_diffusion_nbs.classifier import (ClassifierConfig, ClassifierError, CXRClassifier, conv_block, collate, fit,
                                          save_model_folder, load_model_folder, save_classifier, load_classifier,
                                          shipped_classifier, predict_proba, image_features)

SHIPPED = project_root()/'data'/'models'/'classifier64'

def refused(err, field, fn, *a, **kw):
    with pytest.raises(err) as e: fn(*a, **kw)
    assert e.value.field == field, f'expected field {field!r}, got {e.value.field!r}: {e.value}'
    return e.value

# ---------------------------------------------------------------- config
def test_config_from_dict_coerces_and_refuses():
    c = ClassifierConfig.from_dict({'width': '8', 'epochs': 2.0, 'augment': 'false', 'findings': 'nodule, mass', 'device': 'none'})
    assert c == ClassifierConfig(width=8, epochs=2, augment=False, findings=('nodule', 'mass'))
    assert ClassifierConfig.from_dict(c.to_dict()) == c
    refused(ConfigError, 'widht', ClassifierConfig.from_dict, {'widht': 8})
    refused(ConfigError, 'width', ClassifierConfig.from_dict, {'width': 'wide'})
    refused(ConfigError, 'image_size', ClassifierConfig, image_size=60)
    refused(ConfigError, 'batch_size', ClassifierConfig, batch_size=0)
    refused(ConfigError, 'findings[0]', ClassifierConfig, findings=('nodules',))
    refused(ConfigError, 'findings', ClassifierConfig, findings=())
    e = refused(ConfigError, 'config.lr', ClassifierConfig.from_dict, {'lr': -1}, 'clf.json', 'config')
    assert 'clf.json' in str(e)

# ---------------------------------------------------------------- fit
class Toy(torch.utils.data.Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g); self.y = self.x @ torch.tensor([[2.], [-1.], [0.]])
        self.epochs = []
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return dict(x=self.x[i], y=self.y[i], id=f'i{i}')
    def set_epoch(self, e): self.epochs.append(e)

def mse(m, b): return F.mse_loss(m(b['x']), b['y'])

def test_collate_stacks_tensors_and_lists_the_rest():
    b = collate([Toy()[0], Toy()[1]])
    assert b['x'].shape == (2, 3) and b['id'] == ['i0', 'i1']

def test_fit_learns_is_reproducible_and_logs_parts():
    data = Toy()
    model, hist = fit(lambda: nn.Linear(3, 1), mse, data, epochs=25, batch_size=8, lr=.1, device='cpu')
    assert data.epochs == list(range(25))                            # augmentation gets the epoch
    assert list(hist.columns) == ['epoch', 'images', 'loss', 'seconds'] and (hist.images == 40).all()
    assert hist.loss.iloc[-1] < .05 * hist.loss.iloc[0]
    assert not model.training
    _, again = fit(lambda: nn.Linear(3, 1), mse, Toy(), epochs=25, batch_size=8, lr=.1, device='cpu')
    assert again.loss.tolist() == hist.loss.tolist()
    parts = lambda m, b: (mse(m, b), dict(l1=float((m(b['x']) - b['y']).abs().mean().detach())))
    _, h = fit(nn.Linear(3, 1), parts, Toy(), indices=[0, 1, 2, 3, 4], epochs=2, batch_size=2, lr=.1, device='cpu')
    assert list(h.columns) == ['epoch', 'images', 'loss', 'l1', 'seconds']
    assert h.images.tolist() == [4, 4]                               # the batch of one is skipped (BatchNorm)
    refused(ClassifierError, 'data', fit, nn.Linear(3, 1), mse, Toy(), indices=[], epochs=1, batch_size=2, lr=.1)

# ---------------------------------------------------------------- files
def test_model_folder_round_trip_float32_and_float16(tmp_path):
    torch.manual_seed(0)
    cfg = ClassifierConfig(findings=('nodule', 'mass'), width=4)
    model = CXRClassifier(2, 4).eval()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    save_classifier(model, cfg, tmp_path/'a', note=1)
    save_model_folder(model, cfg, tmp_path/'b', 'classifier', half=True)
    assert load_file(str(tmp_path/'b'/'classifier.safetensors'))['head.weight'].dtype == torch.float16
    a, ca = load_classifier(tmp_path/'a', 'cpu')
    b, _ = load_model_folder(tmp_path/'b', 'classifier', ClassifierConfig, lambda c: CXRClassifier(len(c.findings), c.width), 'cpu')
    assert ca == cfg and json.loads((tmp_path/'a'/'classifier.json').read_text())['note'] == 1
    assert next(b.parameters()).dtype == torch.float32
    np.testing.assert_array_equal(predict_proba(a, x), predict_proba(model, x))
    np.testing.assert_allclose(predict_proba(b, x), predict_proba(model, x), atol=2e-3)
    assert not list(tmp_path.glob('*/.*'))                           # no temporary files left behind

def test_load_refusals_name_file_and_field(tmp_path):
    refused(ClassifierError, 'file', load_classifier, tmp_path)
    save_classifier(CXRClassifier(5, 4), ClassifierConfig(width=4), tmp_path)
    meta = json.loads((tmp_path/'classifier.json').read_text())
    (tmp_path/'classifier.json').write_text(json.dumps(dict(meta, config=dict(meta['config'], width=8))))
    refused(ClassifierError, 'state_dict', load_classifier, tmp_path)
    (tmp_path/'classifier.json').write_text(json.dumps(dict(meta, config=dict(meta['config'], findings=['nodules']))))
    e = refused(ConfigError, 'config.findings[0]', load_classifier, tmp_path)
    assert 'classifier.json' in str(e)
    (tmp_path/'classifier.json').write_text(json.dumps(dict(facts=1)))
    refused(ClassifierError, 'config', load_classifier, tmp_path)

def test_conv_block_is_shared_and_keeps_state_dict_keys():
    m = CXRClassifier(5, 4)
    assert all(isinstance(s, nn.Sequential) and len(s) == 6 for s in m.stages)
    assert set(m.state_dict()) >= {'stages.0.0.weight', 'stages.0.1.running_mean', 'stages.3.4.weight', 'head.weight'}
    assert [type(l) for l in conv_block(1, 4)] == [type(l) for l in m.stages[0]]

@pytest.mark.skipif(not (SHIPPED/'classifier.json').exists(), reason='data/models/classifier64 not shipped')
def test_shipped_classifier_loads_unchanged():
    model, cfg = shipped_classifier('cpu')
    meta = json.loads((SHIPPED/'classifier.json').read_text())
    now = cfg.to_dict()                     # fields added later (stem, low_res, p_low_res) read back at their defaults
    assert {k: now[k] for k in meta['config']} == meta['config'] and now['stem'] == 1 and now['low_res'] is None
    sd = load_file(str(SHIPPED/'classifier.safetensors'))
    assert set(sd) == set(model.state_dict())
    x = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    assert predict_proba(model, x).shape == (2, 5) and image_features(model, x).shape == (2, model.num_features)
