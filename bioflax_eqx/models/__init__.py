from ._transformer import Transformer as Transformer
