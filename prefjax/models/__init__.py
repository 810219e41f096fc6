"""Flax decoder-only transformers: presets, KV cache, reward/value heads, LoRA, HF checkpoints."""

from prefjax.models.config import PRESETS as PRESETS
from prefjax.models.config import RopeScaling as RopeScaling
from prefjax.models.config import TransformerConfig as TransformerConfig
from prefjax.models.config import preset as preset
from prefjax.models.generate import GenerateOutput as GenerateOutput
from prefjax.models.generate import generate as generate
from prefjax.models.generate import greedy_generate as greedy_generate
from prefjax.models.generate import sample_logits as sample_logits
from prefjax.models.hf import config_from_hf as config_from_hf
from prefjax.models.hf import config_to_hf as config_to_hf
from prefjax.models.hf import from_pretrained as from_pretrained
from prefjax.models.hf import save_pretrained as save_pretrained
from prefjax.models.model import LoRA as LoRA
from prefjax.models.model import Model as Model
from prefjax.models.model import from_preset as from_preset
from prefjax.models.model import merge_lora as merge_lora
from prefjax.models.model import param_count as param_count
from prefjax.tokenizer import ByteTokenizer as ByteTokenizer
from prefjax.tokenizer import HFTokenizer as HFTokenizer
from prefjax.tokenizer import load_tokenizer as load_tokenizer
from prefjax.models.transformer import LORA_TARGETS as LORA_TARGETS
from prefjax.models.transformer import KVCache as KVCache
from prefjax.models.transformer import Transformer as Transformer
from prefjax.models.transformer import default_positions as default_positions
from prefjax.models.transformer import last_token_index as last_token_index
