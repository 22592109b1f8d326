"""Raw face photos -> aligned square crops in WebDataset shards -> training batches.

`python -m data_pipeline` prepares shards (see __main__.py); `data_pipeline.loader` feeds
them to the training loop. Nothing here imports the training code (progan/).
"""
