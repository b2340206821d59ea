"""bptt_jax: recurrent networks in JAX, trained with backpropagation through time."""

from bptt_jax import data as data
from bptt_jax import sharding as sharding
from bptt_jax._attention import Attention as Attention
from bptt_jax._attention import AttentionState as AttentionState
from bptt_jax._attention import additive_attention as additive_attention
from bptt_jax._attention import attend as attend
from bptt_jax._attention import attention_carry as attention_carry
from bptt_jax._attention import attention_cell as attention_cell
from bptt_jax._attention import dot_attention as dot_attention
from bptt_jax._attention import general_attention as general_attention
from bptt_jax._cells import Cell as Cell
from bptt_jax._cells import as_cell as as_cell
from bptt_jax._cells import gru as gru
from bptt_jax._cells import irnn as irnn
from bptt_jax._cells import lstm as lstm
from bptt_jax._cells import residual_block as residual_block
from bptt_jax._cells import rnn as rnn
from bptt_jax._cells import stack as stack
from bptt_jax._checkpoint import CheckpointError as CheckpointError
from bptt_jax._checkpoint import load as load_checkpoint
from bptt_jax._checkpoint import restore_latest as restore_latest
from bptt_jax._checkpoint import save as save_checkpoint
from bptt_jax._common import LSTMState as LSTMState
from bptt_jax._common import compute_dtype as compute_dtype
from bptt_jax._common import length_mask as length_mask
from bptt_jax._deer import Deer as Deer
from bptt_jax._deer import DeerInfo as DeerInfo
from bptt_jax._fit import NonFiniteError as NonFiniteError
from bptt_jax._fit import fit as fit
from bptt_jax._flax import NNXRNN as NNXRNN
from bptt_jax._flax import LinenRNN as LinenRNN
from bptt_jax._flax import from_flax as from_flax
from bptt_jax._flax import from_flax_weights as from_flax_weights
from bptt_jax._flax import to_flax_weights as to_flax_weights
from bptt_jax._gradients import RNNGrads as RNNGrads
from bptt_jax._gradients import gradient_flow as gradient_flow
from bptt_jax._gradients import jacobian_norms as jacobian_norms
from bptt_jax._gradients import rnn_bptt as rnn_bptt
from bptt_jax._gradients import rnn_value_and_grad as rnn_value_and_grad
from bptt_jax._keras import from_keras as from_keras
from bptt_jax._kernel import KernelStatus as KernelStatus
from bptt_jax._kernel import kernels as kernels
from bptt_jax._kernel import use_kernels as use_kernels
from bptt_jax._linear_rnn import default_method as default_linear_method
from bptt_jax._linear_rnn import linear_scan as linear_scan
from bptt_jax._linear_rnn import lru as lru
from bptt_jax._linear_rnn import min_gru as min_gru
from bptt_jax._linear_rnn import min_lstm as min_lstm
from bptt_jax._losses import final_loss as final_loss
from bptt_jax._losses import init_readout as init_readout
from bptt_jax._losses import last_step as last_step
from bptt_jax._losses import mse as mse
from bptt_jax._losses import readout as readout
from bptt_jax._losses import sequence_loss as sequence_loss
from bptt_jax._losses import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from bptt_jax._losses import softmax_cross_entropy as softmax_cross_entropy
from bptt_jax._model import Model as Model
from bptt_jax._model import as_model as as_model
from bptt_jax._model import cell_model as cell_model
from bptt_jax._model import model_loss as model_loss
from bptt_jax._model import segmented_loss as segmented_loss
from bptt_jax._seq2seq import Decoded as Decoded
from bptt_jax._seq2seq import Seq2Seq as Seq2Seq
from bptt_jax._seq2seq import beam_search as beam_search
from bptt_jax._seq2seq import greedy_decode as greedy_decode
from bptt_jax._seq2seq import seq2seq as seq2seq
from bptt_jax._seq2seq import seq2seq_loss as seq2seq_loss
from bptt_jax._torch import from_torch as from_torch
from bptt_jax._training import TrainState as TrainState
from bptt_jax._training import apply_gradients as apply_gradients
from bptt_jax._training import guard as guard
from bptt_jax._training import optimizer as optimizer
from bptt_jax._training import train_step as train_step
from bptt_jax._truncated import StreamCarry as StreamCarry
from bptt_jax._truncated import stream_carry as stream_carry
from bptt_jax._truncated import tbptt_step as tbptt_step
from bptt_jax._unroll import bidirectional as bidirectional
from bptt_jax._unroll import bidirectional_stack as bidirectional_stack
from bptt_jax._unroll import deer_unroll as deer_unroll
from bptt_jax._unroll import default_hoist as default_hoist
from bptt_jax._unroll import unroll as unroll

__version__ = "0.1.0"

__all__ = [
    "Attention", "AttentionState", "Cell", "CheckpointError", "Decoded", "Deer", "DeerInfo",
    "LSTMState", "LinenRNN", "Model", "NNXRNN", "NonFiniteError", "RNNGrads", "Seq2Seq",
    "StreamCarry", "TrainState", "additive_attention", "apply_gradients", "as_cell", "as_model",
    "attend", "attention_carry", "attention_cell", "beam_search", "bidirectional",
    "bidirectional_stack", "cell_model", "compute_dtype", "data", "deer_unroll", "default_hoist",
    "default_linear_method", "dot_attention", "final_loss", "fit", "from_flax",
    "from_flax_weights", "from_keras", "from_torch", "general_attention", "gradient_flow",
    "greedy_decode", "gru", "guard", "init_readout", "irnn", "jacobian_norms", "kernels",
    "KernelStatus", "last_step",
    "length_mask", "linear_scan", "load_checkpoint", "lru", "lstm", "min_gru", "min_lstm",
    "model_loss", "mse", "optimizer", "readout", "residual_block", "restore_latest", "rnn",
    "rnn_bptt", "rnn_value_and_grad", "save_checkpoint", "segmented_loss", "seq2seq",
    "seq2seq_loss", "sequence_loss", "sharding", "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy", "stack",
    "stream_carry", "tbptt_step", "to_flax_weights", "train_step", "unroll", "use_kernels",
]
