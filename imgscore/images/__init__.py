"""Images in: scanning ``input.root`` (local or object store), the decoder allow-list, decoding, the shard's Dataset."""
