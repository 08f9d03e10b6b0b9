# CLIP-style model: timm ViT-B/16 on 1-channel 224 px radiographs + a BERT-base-size text tower trained from
# scratch with a WordPiece vocabulary learned on the training reports (no weights are downloaded). The ViT's
# img_size comes from the dataset config's img_size knob.
# To start from pretrained weights instead, set image_encoder.pretrained_path to a local timm checkpoint and
# text_encoder.pretrained to a local BERT-family directory (e.g. a CXR-BERT or PubMedBERT download) with
# text_encoder.config=None: architecture and tokenizer then come from that folder (a WordPiece vocabulary is only
# trained for a text tower built from scratch; a tokenizer that does not match the weights is refused).
model = dict(
    image_encoder=dict(type="vit2d", model_name="vit_base_patch16_224", in_chans=1),
    text_encoder=dict(
        type="bert",
        config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    max_position_embeddings=512),
        tokenizer=dict(type="wordpiece", vocab_size=30000, min_frequency=2),
        pooling="cls",
        max_length=128,
    ),
    heads=[dict(type="clip", embed_dim=512)],
)
