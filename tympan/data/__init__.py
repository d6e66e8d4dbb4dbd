"""tympan.data: datafiles, label sets, datasets, augmentation, balanced/distributed sampling and tar shards.

>>> from tympan.data import AudioDataset, DistributedSampler, Mixup, SpecAugment, collate_audio, fsdd_datafile
>>> files = fsdd_datafile("/data", "out/")
>>> train = AudioDataset(read_datafile(files.datafile).select(split="train"), files.labels, clip_seconds=1.0,
...                      train=True)
>>> loader = DataLoader(train, batch_size=32, sampler=DistributedSampler(train), collate_fn=collate_audio)
"""

from tympan.data.augment import (
    AddNoise,
    Augmentation,
    Compose,
    Mixup,
    NoiseRoll,
    RandomGain,
    SpecAugment,
    TimeRoll,
    mask_along_axis,
    mix_batch,
    roll_along,
    sample_beta,
)
from tympan.data.datasets import AudioDataset, ClipPipeline, Collate, collate_audio, crop_or_pad
from tympan.data.manifest import (
    DatafileError,
    Dataset,
    DatafilePaths,
    Manifest,
    MultiHot,
    Record,
    esc10_datafile,
    fsdd_datafile,
    fsdd_split,
    import_dataset,
    load_dataset,
    read_datafile,
    write_datafile,
    write_label_csv,
)
from tympan.data.sampling import BalancedSampler, DistributedSampler, balanced_weights, part_range, seeded_generator
from tympan.data.shards import (
    ShardDataset,
    ShardIndex,
    read_shard_index,
    write_shards,
)

__all__ = [
    "AddNoise",
    "AudioDataset",
    "Augmentation",
    "BalancedSampler",
    "ClipPipeline",
    "Collate",
    "Compose",
    "DatafileError",
    "DatafilePaths",
    "Dataset",
    "DistributedSampler",
    "Manifest",
    "Mixup",
    "MultiHot",
    "NoiseRoll",
    "RandomGain",
    "Record",
    "ShardDataset",
    "ShardIndex",
    "SpecAugment",
    "TimeRoll",
    "balanced_weights",
    "collate_audio",
    "crop_or_pad",
    "esc10_datafile",
    "fsdd_datafile",
    "fsdd_split",
    "import_dataset",
    "load_dataset",
    "mask_along_axis",
    "mix_batch",
    "part_range",
    "read_datafile",
    "read_shard_index",
    "roll_along",
    "sample_beta",
    "seeded_generator",
    "write_datafile",
    "write_label_csv",
    "write_shards",
]
