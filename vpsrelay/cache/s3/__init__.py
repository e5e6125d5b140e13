"""The blob store on an S3-compatible bucket shared by several relay nodes.

`client` speaks S3 (httpx, signed by botocore in `signing`), `lease` decides which node
fills a blob, `reader` reads objects back verified, `evict` evicts across nodes, `tags`
shares tags; `store` is the `BlobStore`, in layers of a module each (`bucket`, `filling`,
`lookups`, `store`: see its docstring).
"""
