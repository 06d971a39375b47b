"""Shared config builder: one ConfigDict per (arch, preset). Each experiments/configs/X.py calls it.

Presets:
- paper: the CVPR / seed-report recipe: SGD batch 20, momentum 0.9, weight decay 5e-4, biases 2x lr,
  fixed lr (VGG16 1e-4, AlexNet 1e-3, GoogLeNet 5e-5; staged nets 100x lower per stage), normalised
  loss, SBD train -> seg11valid, 175 epochs. The default.
- heavy: the Caffe reference "heavy" models: batch 1, summed loss, momentum 0.99, lr 1e-10 / 1e-12 /
  1e-14, 100k iterations (at-once 300k).
- demo: the synthetic VOC-format set at reduced width on a CPU (minutes).
"""

from __future__ import annotations

import ml_collections

from fcn_jax import paths
from fcn_jax.errors import UserError

# Default persistent XLA compilation cache (see fcn_jax.paths.xla_cache_dir).
COMPILATION_CACHE_DIR = str(paths.xla_cache_dir())

PRESETS = ('paper', 'heavy', 'demo', 'scratch')
# The nets the scratch preset trains (single-stage, VGG16: its backbone becomes vgg16_bn).
SCRATCH_ARCHS = ('fcn8s_atonce', 'fcn32s')
# The stage each staged net is initialised from (FCN-16s from FCN-32s, FCN-8s from FCN-16s).
PREDECESSOR = {'fcn16s': 'fcn32s', 'fcn8s': 'fcn16s'}

PAPER_LR = {'fcn32s': 1e-4, 'fcn16s': 1e-6, 'fcn8s': 1e-8, 'fcn8s_atonce': 1e-4,
            'fcn_alexnet': 1e-3, 'fcn_alexnet_caffe': 1e-3, 'fcn_googlenet': 5e-5}
HEAVY_LR = {'fcn32s': 1e-10, 'fcn16s': 1e-12, 'fcn8s': 1e-14, 'fcn8s_atonce': 1e-10,
            'fcn_alexnet': 1e-10, 'fcn_alexnet_caffe': 1e-10, 'fcn_googlenet': 1e-10}
ALEXNETS = ('fcn_alexnet', 'fcn_alexnet_caffe')
RESNETS = ('fcn_resnet50', 'fcn_resnet101')  # torchvision's FCN: its own recipe (paper preset)


# The reference nets of the paper's other datasets (experiments/<name>.py): arch, dataset, its
# training split, crop size (the datasets' largest image side) and input modalities.
_CONTEXT = ('pascal_context', 'train', 500, (('color', 'pascal_context_bgr'),))
_SIFT_FLOW = ('sift_flow', 'trainval', 256, (('color', 'sift_flow_bgr'),))
_NYUD = ('nyud_v2', 'train', 560)
_COLOR_DEPTH = (('color', 'nyud_bgr'), ('depth', 'nyud_log_depth'))
_COLOR_HHA = (('color', 'nyud_bgr'), ('hha', 'nyud_hha'))
RECIPES = {
    'pascalcontext_fcn32s': ('fcn32s', *_CONTEXT),
    'pascalcontext_fcn16s': ('fcn16s', *_CONTEXT),
    'pascalcontext_fcn8s': ('fcn8s', *_CONTEXT),
    'siftflow_fcn32s': ('fcn32s_two_heads', *_SIFT_FLOW),
    'siftflow_fcn16s': ('fcn16s_two_heads', *_SIFT_FLOW),
    'siftflow_fcn8s': ('fcn8s_two_heads', *_SIFT_FLOW),
    'nyud_fcn32s_color': ('fcn32s', *_NYUD, (('color', 'nyud_bgr'),)),
    'nyud_fcn32s_hha': ('fcn32s', *_NYUD, (('hha', 'nyud_hha'),)),
    'nyud_fcn32s_color_d': ('fcn32s_early_fusion', *_NYUD, _COLOR_DEPTH),
    'nyud_fcn32s_color_hha': ('fcn32s_late_fusion', *_NYUD, _COLOR_HHA),
    'nyud_fcn16s_color_hha': ('fcn16s_late_fusion', *_NYUD, _COLOR_HHA),
}
# Staged recipes start from the coarser one, as on VOC.
RECIPE_PREDECESSOR = {'pascalcontext_fcn16s': 'pascalcontext_fcn32s',
                      'pascalcontext_fcn8s': 'pascalcontext_fcn16s',
                      'siftflow_fcn16s': 'siftflow_fcn32s', 'siftflow_fcn8s': 'siftflow_fcn16s',
                      'nyud_fcn16s_color_hha': 'nyud_fcn32s_color_hha'}
# Fixed learning rates (paper, heavy) of the recipes, by stride: the paper's staged rates and the
# reference "heavy" solvers (ZOO.md sec. 3); the colour + HHA late-fusion nets take the 16s rates.
_LR_32S, _LR_16S, _LR_8S = (1e-4, 1e-10), (1e-6, 1e-12), (1e-8, 1e-14)
RECIPE_LR = {
    'pascalcontext_fcn32s': _LR_32S, 'pascalcontext_fcn16s': _LR_16S, 'pascalcontext_fcn8s': _LR_8S,
    'siftflow_fcn32s': _LR_32S, 'siftflow_fcn16s': _LR_16S, 'siftflow_fcn8s': _LR_8S,
    'nyud_fcn32s_color': _LR_32S, 'nyud_fcn32s_hha': _LR_32S, 'nyud_fcn32s_color_d': _LR_32S,
    'nyud_fcn32s_color_hha': _LR_16S, 'nyud_fcn16s_color_hha': _LR_16S,
}


def predecessor(name: str) -> str | None:
  """The experiment a staged one is initialised from (FCN-16s from FCN-32s, ...)."""
  return RECIPE_PREDECESSOR.get(name) if name in RECIPES else PREDECESSOR.get(name)


def get_config(arch: str, preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config of an arch (PASCAL VOC) or of a reference recipe of another dataset (RECIPES):
  every default (`base_config`, the paper's recipe), then the preset's changes."""
  if arch in RECIPES:
    return _recipe_config(arch, preset)
  preset = preset or 'paper'
  if preset not in PRESETS:
    raise UserError(f'unknown preset {preset!r} for {arch}; choose one of {", ".join(PRESETS)} '
                    f'(e.g. --config experiments/configs/{arch}.py:demo)')
  if preset == 'heavy' and arch in RESNETS:
    raise UserError(f'{arch} has no Caffe "heavy" recipe; use the paper preset (torchvision\'s '
                    'recipe) or demo')
  c = base_config(arch, preset)
  PRESET_CHANGES[preset](c, arch)
  return c


def base_config(arch: str, preset: str = 'paper') -> ml_collections.ConfigDict:
  """Every field with its default: the paper's recipe (SBD train -> seg11valid)."""
  c = ml_collections.ConfigDict()
  c.arch = arch
  c.name = arch  # the experiment (experiments/<name>.py)
  # Nets with several inputs: [(modality, preprocessing)] in channel order (() = the colour image
  # with config.preprocessing).
  c.modalities = ()
  c.preset = preset
  c.seed = 0  # initialisation, data order and dropout
  c.class_names = ()  # () = from the dataset (PASCAL VOC's 21; a dataset's classes.txt)

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 0  # 0 = from the dataset; another number must match it
  c.model.width = 1.0
  c.model.dtype = 'float32'          # compute dtype; 'bfloat16' on GPU/TPU
  c.model.learnable_upsampling = True  # intermediate deconvolutions (the final one is always fixed)
  c.model.dropout_rate = ml_collections.config_dict.placeholder(float)  # None: 0.5 after fc6/fc7
  c.model.skip_scaling = True  # FCN-8s at-once's fixed skip scales (False: from scratch)
  # 0 = from the inputs: 3 for colour, the dataset's bands with preprocessing='dataset'.
  c.model.in_channels = 0

  _dataset_defaults(c)

  # Caffe-trained VGG16 weights expect BGR minus the mean; converted checkpoints record their own.
  # 'dataset': the training data's per-channel statistics (TIFF bands, 16-bit PNG).
  c.preprocessing = 'caffe_bgr'
  c.init_from = ''  # checkpoint dir (converted backbone, previous stage) or pretrained:NAME
  c.train_predecessor = False  # staged nets: train the previous stage first if init_from is empty

  c.batch_size = 20            # images per jit step (global, across devices and hosts)
  c.accumulate_steps = 1       # micro-steps per optimiser update (Caffe iter_size)
  # VOC images are at most 500x500: padding to 500 loses nothing; 0 = from the data.
  c.crop_size = 500
  c.scale_range = ()           # e.g. (0.5, 1.5) for random scaling
  c.flip = False               # the paper found no gain from mirroring
  # Photometric augmentation of the colour image: brightness, contrast and saturation each scaled
  # by a random factor in [1 - s, 1 + s] (0 = off, the paper's).
  c.color_jitter = 0.0
  c.data_workers = 0  # grain worker processes decoding images (0: in this process)
  # Length: num_train_steps optimiser updates when > 0, else total_epochs passes over the training
  # set, turned into updates at run time (batch_size x accumulate_steps images per update).
  c.total_epochs = 175.0
  c.num_train_steps = 0
  c.loss_normalize = True
  # 'none' | 'median_frequency' | 'median_frequency:P' (to the power P) | per class: '1,2,0.5'
  c.loss_class_weights = 'none'
  # The loss, a weighted sum of terms NAME[:WEIGHT][:OPTION=VALUE...] joined by commas: ce
  # (cross-entropy, the paper's; smoothing=), ohem (thresh=0.7, min_kept=100000 per image), dice
  # (smooth=1), lovasz (classes=present|all), focal (gamma=2). E.g. 'ce:1.0,dice:0.5'.
  c.loss = 'ce'

  _optim_defaults(c, arch)

  _run_defaults(c)
  if arch in RESNETS:
    _torchvision_recipe(c, arch)
  return c


def _optim_defaults(c: ml_collections.ConfigDict, arch: str) -> None:
  """The paper's optimiser: Caffe's SGD, fixed rate."""
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = PAPER_LR.get(arch, PAPER_LR['fcn32s'])
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.bias_lr_mult = 2.0
  c.optim.schedule = 'fixed'   # fixed | poly | cosine | step (lr * step_gamma every step_every)
  c.optim.poly_power = 0.9     # poly: lr * (1 - t / T) ** poly_power
  c.optim.warmup_steps = 0     # linear warm-up over this many updates (0: none, the paper's)
  c.optim.warmup_ratio = 0.001  # warm-up starts at lr * warmup_ratio
  c.optim.step_every = 0       # step: updates between rate drops
  c.optim.step_gamma = 0.1     # step: the factor of each drop
  c.optim.caffe = True         # exactly Caffe's SGD update
  c.optim.algorithm = 'sgd'    # 'adam' only for the from-scratch CPU demo


def _run_defaults(c: ml_collections.ConfigDict) -> None:
  """Cadences, the checkpoints kept and "best", weight averaging, early stopping, evaluation,
  experiment tracking."""
  # Cadences, like every step count here and in metrics.jsonl / checkpoints: optimiser updates.
  c.log_every = 50  # metrics.jsonl / TensorBoard / progress line
  c.eval_every = 4000  # evaluation on the eval split (and at the end)
  c.checkpoint_every = 1000  # also at every evaluation and at the end
  c.keep_checkpoints = 2  # the latest N (the best one is kept besides)
  # "best" (kept besides the latest, loaded by default for inference): the step with the highest
  # best_metric (pixel_acc | mean_acc | mean_iu | fw_iu) of best_head ('' = the first head).
  c.best_metric = 'mean_iu'
  c.best_head = ''  # nets with several heads: the head best_metric and early stopping read
  # >0: also keep an exponential moving average (EMA) of the weights and trained BatchNorm
  # statistics, e.g. 0.999 (bias-corrected, once per update); evaluations report both (metrics.jsonl
  # kinds eval and eval_ema). The rule: with EMA on, best, early stopping, results.json and figures
  # use the EMA weights, and the checkpoints give them to inference and init_from (load_inference,
  # Segmenter.load; metadata inference_weights='ema'). 0 = off.
  c.ema_decay = 0.0
  # '' = off, or a score (e.g. mean_iu): stop when it has not grown by more than
  # early_stopping_min_delta for early_stopping_patience evaluations in a row (eval_every).
  c.early_stopping_metric = ''
  c.early_stopping_patience = 5  # evaluations without improvement before stopping
  c.early_stopping_min_delta = 0.0  # the smallest gain that counts (scores are fractions)
  # With eval_pad_to 0: native size (the reference protocol), one image at a time, or B > 1 images
  # of the same size at a time (the same scores; pipeline.eval_batches).
  c.eval_batch_size = 1
  # >0: fixed (eval_batch_size, S, S) padded batches (faster, approximate borders); -1: S from the
  # data (the evaluation images' largest side, rounded up to 32), checked before the first step.
  c.eval_pad_to = 0
  c.num_figure_examples = 4  # evaluation images in figures/score_maps.png
  # Persistent XLA compilation cache shared by all runs ('' = off): native-size evaluation compiles
  # once per distinct image size, and a rerun or the next stage reuses every compiled program.
  c.compilation_cache_dir = COMPILATION_CACHE_DIR
  # Where metrics.jsonl is mirrored (fcn_jax.tracking), comma-separated: tensorboard
  # (WORKDIR/tensorboard), mlflow, wandb; '' = metrics.jsonl only. mlflow and wandb need
  # pip install -e '.[tracking]'.
  c.tracking = 'tensorboard'
  c.tracking_uri = ''  # MLflow's store: '' = file:WORKDIR/mlruns (no server), or sqlite:///...
  c.wandb_project = ''  # '' = fcn_jax
  c.wandb_mode = 'offline'  # offline (no account or network; `wandb sync` later), online, disabled


def _torchvision_recipe(c: ml_collections.ConfigDict, arch: str) -> None:
  """FCN-ResNet's paper preset: torchvision's reference recipe (references/segmentation: SGD 0.02,
  momentum 0.9, weight decay 1e-4, poly 0.9, 30 epochs, batch 32, crop 480, random resize 0.5-2x,
  flips, the auxiliary loss at 0.5), from its ImageNet ResNet, on our PASCAL VOC split."""
  c.model.aux = True   # torchvision's auxiliary FCNHead on layer3 (training only needs it)
  c.model.bn_frozen = False  # True: keep the BatchNorm statistics (small batches)
  c.aux_loss_weight = 0.5  # the auxiliary head's share of the loss
  c.preprocessing = 'torchvision_rgb'
  c.init_from = f'pretrained:{arch.replace("fcn_", "")}-torchvision'
  c.batch_size, c.crop_size, c.scale_range, c.flip = 32, 480, (0.5, 2.0), True
  c.total_epochs = 30.0
  c.optim.learning_rate, c.optim.momentum, c.optim.weight_decay = 0.02, 0.9, 1e-4
  c.optim.bias_lr_mult, c.optim.schedule, c.optim.caffe = 1.0, 'poly', False


def _dataset_defaults(c: ml_collections.ConfigDict) -> None:
  """config.dataset: which data, where, and how a user dataset is read."""
  c.dataset = ml_collections.ConfigDict()
  # sbd | voc_segmentation/2012 | voc_segmentation/2011, or your own data: folder | coco |
  # voc_like | pairs | split_folders with dataset.root (see fcn_jax.data.layouts).
  c.dataset.name = 'sbd'
  c.dataset.root = ''            # the user dataset's directory
  c.dataset.classes_file = ''    # '' = ROOT/classes.txt (a file elsewhere keeps ROOT untouched)
  c.dataset.val_fraction = 0.1   # folder format without splits/: the share of images in 'val'
  c.dataset.ignore_label = 255   # the mask value to ignore in a user dataset's index masks
  c.dataset.image_suffix = ''    # split_folders: image files <id><image_suffix> ('' = any image)
  c.dataset.mask_suffix = ''     # split_folders: mask files <id><mask_suffix> ('' = <id>.png)
  c.dataset.train_split = 'train'  # the split to train on
  # '' = the dataset's default evaluation: VOC2011 seg11valid for sbd (the paper), else 'val' of
  # the training dataset.
  c.dataset.eval_name = ''
  c.dataset.eval_split = ''  # '' = the dataset's default evaluation split
  c.dataset.data_dir = '~/tensorflow_datasets'  # where datasets are prepared (array_record)
  c.dataset.manual_dir = ''  # folder with the archives or their extracted trees
  c.dataset.download = False  # fetch the official archives when not prepared


def _paper(c: ml_collections.ConfigDict, arch: str) -> None:
  """The paper's recipe is the base."""
  del c, arch


def _heavy(c: ml_collections.ConfigDict, arch: str) -> None:
  """Caffe's "heavy" reference models: batch 1, summed loss, momentum 0.99."""
  c.batch_size = 1
  c.loss_normalize = False
  c.optim.momentum = 0.99
  c.optim.learning_rate = HEAVY_LR.get(arch, HEAVY_LR['fcn32s'])
  c.num_train_steps = 300_000 if arch == 'fcn8s_atonce' else 100_000
  if arch in ALEXNETS:  # Caffe voc-fcn-alexnet: normalised loss, lr 1e-4, iter_size 20
    c.loss_normalize, c.optim.learning_rate, c.optim.momentum = True, 1e-4, 0.9
    c.accumulate_steps = 20


def _demo(c: ml_collections.ConfigDict, arch: str) -> None:
  """The synthetic VOC-format set (or your own data) from scratch at 1/16 width on a CPU."""
  # From scratch (no ImageNet weights can be assumed), 1/16 width, on a 2-core CPU in minutes:
  # Adam and no dropout get there in ~1000 steps where the paper's SGD would need far more.
  c.model.width = 0.0625
  c.model.dropout_rate = 0.0
  # From scratch, at-once's fixed skip scales (0.01, 0.0001, sized for ImageNet features under
  # SGD) mute the pool3 / pool4 skips: FCN-8s at-once then learns no better than FCN-32s.
  c.model.skip_scaling = False
  c.preprocessing = 'torchvision_rgb'  # unit-scale inputs suit a from-scratch init
  c.init_from = ''
  c.dataset.name = 'voc_segmentation/2012'  # the synthetic set, unless a dataset is named
  # Empty: the synthetic set and its prepared TFDS files, in the cache (see fcn_jax.paths); a
  # manual_dir (and data_dir) of your own trains the demo recipe on that data instead.
  c.dataset.data_dir = ''
  c.dataset.manual_dir = ''
  c.synthetic = ml_collections.ConfigDict({'num_train': 240, 'num_val': 64, 'min_size': 128,
                                           'max_size': 160, 'seed': 0})
  c.batch_size = 4
  c.crop_size = 128
  c.flip = True
  # FCN-32s learns the classes; the skip stages then fine-tune from it (new score layers at zero).
  single_stage = ('fcn32s', 'fcn8s_atonce', 'fcn_googlenet') + ALEXNETS
  c.num_train_steps = 1000 if arch in single_stage else 300
  c.optim.algorithm = 'adam'
  c.optim.learning_rate = 1e-3
  c.optim.momentum = 0.9
  c.log_every = 25
  c.eval_every = 250 if arch == 'fcn32s' else 150
  c.checkpoint_every = 150
  c.eval_batch_size = 8
  c.eval_pad_to = -1  # from the data: 160 on the synthetic set, 480 on 480x360 photos
  c.num_figure_examples = 4


def _scratch(c: ml_collections.ConfigDict, arch: str) -> None:
  """From scratch (no ImageNet weights) on real photographs, on a 2-core CPU in ~15 minutes
  (CamVid: benchmarks/real_data.py). Name the data: --config.dataset.name=LAYOUT
  --config.dataset.root=ROOT."""
  if arch not in SCRATCH_ARCHS:
    raise UserError(f'the scratch preset trains {", ".join(SCRATCH_ARCHS)} (single-stage VGG16 '
                    f'nets); {arch} has no scratch recipe')
  # VGG16 with BatchNorm that trains (conv -> BN -> ReLU, torchvision vgg16_bn's layout) and
  # 'same' padding instead of the pad of 100: BN lets Adam take large steps from a random init,
  # and without the 100-pixel border a 256 crop costs half the work (models.build(backbone=)).
  c.model.backbone = 'vgg16_bn'
  # Capacity per FLOP: 1/8 width (8..64 channels, fc6/fc7 512, 2.1M parameters) takes 0.50 s per
  # step (batch 8, crop 256, AMD EPYC, 2 cores, idle) against 1.33 s at 1/4 and 2.10 s at 3/8:
  # ~2.7x the updates of 1/4 in the same minutes; 700 steps reached 44.7 mean IU on CamVid val.
  c.model.width = 0.125
  c.model.dropout_rate = 0.0
  c.model.skip_scaling = False  # the demo's reason: the fixed scales mute from-scratch skips
  c.preprocessing = 'torchvision_rgb'
  c.dataset.name = 'folder'
  c.batch_size = 8
  c.crop_size = 256
  c.scale_range = (0.75, 1.5)
  c.flip = True
  # Brightness / contrast / saturation in [0.7, 1.3]: CamVid val 44.7 -> 45.7 mean IU (1000 steps).
  c.color_jitter = 0.3
  # ~0.8 s per step with the input pipeline (10 img/s on the 2-core EPYC at load ~3): ~13 minutes,
  # ~1 more for the native-size evaluation of CamVid test (233 images).
  c.num_train_steps = 1000
  # Mean IU weighs every class alike: median-frequency balancing (SegNet) lifts the rare ones; its
  # square roots stop the rare classes taking the large ones' pixels (full weights gave 73% of
  # CamVid building pixels to pole / sign / fence ...): val 45.7 -> 53.6 mean IU, building 38 -> 70.
  c.loss_class_weights = 'median_frequency:0.5'
  c.optim.algorithm = 'adam'
  c.optim.learning_rate = 2e-3
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.bias_lr_mult = 1.0
  c.optim.schedule = 'poly'
  c.log_every = 50
  c.eval_every = 0  # evaluate once, at the end (each evaluation costs minutes of the budget)
  c.checkpoint_every = 500
  c.eval_batch_size = 1
  c.eval_pad_to = 0  # native size (CamVid 480x360)
  c.num_figure_examples = 4


PRESET_CHANGES = {'paper': _paper, 'heavy': _heavy, 'demo': _demo, 'scratch': _scratch}


def _recipe_config(name: str, preset: str) -> ml_collections.ConfigDict:
  arch, dataset, train_split, crop_size, modalities = RECIPES[name]
  c = get_config(arch, preset)
  c.name = name
  c.dataset.name = dataset
  c.dataset.train_split = train_split
  c.modalities = tuple(modalities)
  c.preprocessing = modalities[0][1]
  c.crop_size = crop_size
  paper_lr, heavy_lr = RECIPE_LR[name]
  if c.preset == 'paper':
    c.optim.learning_rate = paper_lr
  elif c.preset == 'heavy':
    c.optim.learning_rate = heavy_lr
    c.num_train_steps = 300_000
  elif c.preset == 'demo':
    c.dataset.data_dir = '~/tensorflow_datasets'
    c.crop_size = 64
  return c
