# CLIP-style model: timm ViT-B/16 on 1-channel 224 px radiographs + a BERT-base-size text tower trained from
# scratch with a WordPiece vocabulary learned on the training reports (no weights are downloaded).
# To start from pretrained weights instead, set image_encoder.pretrained_path to a local timm checkpoint and
# text_encoder.pretrained to a local BERT-family directory (e.g. a CXR-BERT or PubMedBERT download).
model = dict(
    image_encoder=dict(type="vit2d", model_name="vit_base_patch16_224", img_size=224, in_chans=1),
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
