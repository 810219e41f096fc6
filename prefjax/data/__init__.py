"""Preference, feedback, prompt and SFT data: schemas, readers, validation, batching, tasks.

Batches are dicts of NumPy arrays with fixed shapes (``[batch, seq]`` int32 ids and 0/1 masks;
``loss_mask`` marks response tokens including EOS). See ``docs/data.md``.
"""

from prefjax.data import packing as packing
from prefjax.data.batching import BatchIterator as BatchIterator
from prefjax.data.batching import bucket_length as bucket_length
from prefjax.data.batching import collate as collate
from prefjax.data.batching import collate_packed as collate_packed
from prefjax.data.batching import default_buckets as default_buckets
from prefjax.data.batching import padding_fractions as padding_fractions
from prefjax.data.batching import positions_from_mask as positions_from_mask
from prefjax.data.dataset import TokenizedDataset as TokenizedDataset
from prefjax.data.dataset import concatenate as concatenate
from prefjax.data.errors import DataError as DataError
from prefjax.data.errors import DropReport as DropReport
from prefjax.data.errors import Row as Row
from prefjax.data.loaders import datasets_from_config as datasets_from_config
from prefjax.data.loaders import load_dataset as load_dataset
from prefjax.data.loaders import load_rows as load_rows
from prefjax.data.loaders import load_split_datasets as load_split_datasets
from prefjax.data.loaders import task_from_config as task_from_config
from prefjax.data.readers import read_records as read_records
from prefjax.data.readers import read_tfds as read_tfds
from prefjax.data.readers import write_jsonl as write_jsonl
from prefjax.data.schemas import detect_kind as detect_kind
from prefjax.data.schemas import detect_kind_of_rows as detect_kind_of_rows
from prefjax.data.schemas import normalize as normalize
from prefjax.data.schemas import split_common_prefix as split_common_prefix
from prefjax.data.schemas import validate_rows as validate_rows
from prefjax.data.splits import LeakageReport as LeakageReport
from prefjax.data.splits import check_leakage as check_leakage
from prefjax.data.splits import grouped_split as grouped_split
from prefjax.data.tasks import ArithmeticTask as ArithmeticTask
from prefjax.data.tasks import Bandit as Bandit
from prefjax.data.tasks import RepeatTask as RepeatTask
from prefjax.data.tasks import make_task as make_task
from prefjax.data.tasks import preference_probability as preference_probability
from prefjax.data.tfds_builder import build_tfds as build_tfds
from prefjax.data.tokenize import TruncationPolicy as TruncationPolicy
from prefjax.data.tokenize import step_separator_id as step_separator_id
from prefjax.data.tokenize import tokenize as tokenize
