"""The data sections of params.yaml: sources, the synthetic world, ingest, preprocess, index (components/core/config.py
gathers every section into `Params`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.core.section import Section


# ---------------------------------------------------------------- ingest
class Source(Section):
    """One input source. Set exactly one of `synthetic`, `path`, `url`, `hf`."""

    synthetic: bool = False
    """The embedded, seeded synthetic world (see components/data/synthetic.py)."""
    path: str | None = None
    """A local file or folder (recursive): .txt .md .jsonl .csv .parquet, optionally .gz."""
    url: str | None = None
    """An http(s) URL of one such file; downloaded once and checked against `sha256`."""
    hf: str | None = None
    """A Hugging Face dataset name (needs the network; offline it fails with a clear error)."""
    hf_config: str | None = None
    """The dataset's configuration (subset) name, for `hf` sources."""
    split: str = "train"
    """The dataset split, for `hf` sources."""
    text_field: str = "text"
    """Column (csv/parquet/hf) or key (jsonl) holding the text of pretraining sources."""
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """Expected sha256 of a `url` download (hex). Required for urls, so a download is reproducible."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("synthetic", "path", "url", "hf") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of synthetic/path/url/hf (got {given or 'none'})")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http(s): {self.url!r}")
        if self.url and not self.sha256:
            raise ValueError("a url source needs `sha256:` (run `sha256sum` on the file once)")
        return self


class SyntheticConfig(Section):
    """The embedded default: an invented world of entities and their attributes."""

    entities: int = Field(default=60, ge=4, le=100_000)
    """How many invented entities the world holds."""
    paraphrases: int = Field(default=6, ge=1, le=100)
    """How many differently worded sentences state each fact in the pretraining corpus."""
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Fraction of facts whose questions are kept out of SFT and asked only in evaluation."""
    updates: float = Field(default=0.75, ge=0, le=1)
    """Fraction of entities with a fact that changes after training (moves town, changes trade, new pet): news
    documents for the index only (`index.sources: synthetic`), never the pretraining corpus. A third of them
    appear in SFT context rows; the others are the knowledge-cutoff questions of evaluate."""
    context_share: float = Field(default=1.5, ge=0, le=10)
    """SFT rows answered from supplied passages among distractors (`task: context`), as a share of the question
    rows (qa + yes/no); see components/data/updates.py."""
    dialogues: float = Field(default=0.5, ge=0, le=10)
    """Multi-turn SFT conversations (`task: dialogue`: 2-3 questions in a row, each answer about its own
    question), as a share of the qa rows. Evaluation always gets one per held-out fact: the held-out question
    asked after a turn about another fact."""


class IngestConfig(Section):
    pretrain_sources: list[Source] = Field(default_factory=lambda: [Source(synthetic=True)], min_length=1)
    """Raw text for causal-LM pretraining."""
    sft_sources: list[Source] = Field(default_factory=lambda: [Source(synthetic=True)], min_length=1)
    """Instruction data: JSONL in Alpaca form {instruction, input?, output} or chat form {messages}."""
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    skip_malformed: bool = False
    """Skip (and count) malformed rows instead of failing on the first one."""
    shard_rows: int = Field(default=100_000, ge=1)
    """Rows per output shard."""
    max_download_mb: int = Field(default=2048, ge=1)
    """Refuse url downloads larger than this."""
    max_line_mb: float = Field(default=16, gt=0, le=1024)
    """Refuse (or skip, with skip_malformed) a single line/row larger than this."""


# ---------------------------------------------------------------- preprocess
class PreprocessConfig(Section):
    normalization: Literal["NFC", "NFKC", "none"] = "NFKC"
    """Unicode normalization form applied to every text."""
    min_chars: int = Field(default=8, ge=0)
    """Drop documents shorter than this after cleaning."""
    max_chars: int = Field(default=200_000, ge=1)
    """Drop documents longer than this after cleaning."""
    dedup: Literal["exact", "near", "none"] = "exact"
    """Exact: drop repeated documents by hash. near: also MinHash near-duplicates."""
    near_threshold: float = Field(default=0.85, gt=0, le=1)
    """Jaccard similarity over word 5-grams above which two documents are near-duplicates."""
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    """Fraction of pretraining documents (by content hash) kept for validation."""
    sft_test_fraction: float = Field(default=0.1, gt=0, lt=0.9)
    """Fraction of instruction rows held out for evaluation (rows that carry `split` keep it)."""
    vocab_size: int = Field(default=1024, ge=64, le=1_000_000)
    """BPE vocabulary size when training a tokenizer (ignored when model.init_from is set)."""
    min_frequency: int = Field(default=2, ge=1)
    """BPE merges need at least this many occurrences."""
    tokenizer_sample_mb: float = Field(default=16, gt=0)
    """The tokenizer learns from the first this many MiB of the train split (and of the SFT train messages);
    the report says how much it used (`tokenizer.sample_mb`)."""
    dedup_mb: float = Field(default=64, gt=0, le=65536)
    """Memory of each de-dup filter (a Bloom filter: fixed size whatever the corpus). Its false-positive rate
    (a unique document dropped) is in the report; 64 MiB: 1e-7 at 1M documents, 6e-4 at 20M."""
    workers: int = Field(default=1, ge=1, le=1024)
    """Processes (or Dask workers, for a local cluster) that clean and tokenize pieces of the corpus in
    parallel; 1 works in this process. The outputs are the same for any number."""
    engine: Literal["local", "dask"] = "local"
    """local: this machine (`workers` processes). dask: tasks on a Dask cluster (dask.distributed);
    every worker must see the data folders at the same paths (README, "Preprocessing at scale")."""
    dask_address: str | None = None
    """engine dask: the scheduler to use (e.g. tcp://10.0.0.5:8786); null starts a local cluster of `workers`."""
    chunk_mb: float = Field(default=8, gt=0, le=4096)
    """Size of the unit of work: ingest's shards are cut into pieces of about this many MiB of JSON lines."""

    @model_validator(mode="after")
    def _lengths(self) -> PreprocessConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(
                f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars}): every document "
                "would be dropped; lower min_chars or raise max_chars"
            )
        return self


# ---------------------------------------------------------------- index
class IndexConfig(Section):
    """The retrieval index over your documents (components/retrieval): chunks, BM25 and optional dense vectors."""

    sources: list[Source] = Field(default_factory=lambda: [Source(synthetic=True)])
    """Documents to index besides the pretraining corpus, in ingest's source forms (files, folders, urls, hf).
    `synthetic: true` = the embedded world's news: facts that changed after training."""
    include_pretrain: bool = True
    """Also index the ingested pretraining documents (ingest's output)."""
    chunk_tokens: int = Field(default=40, ge=8, le=8192)
    """Chunk length in the pipeline tokenizer's tokens (whole sentences, split only when one is longer)."""
    overlap_tokens: int = Field(default=10, ge=0)
    """Tokens shared by consecutive chunks of a document (whole sentences)."""
    retrieval: Literal["auto", "bm25", "dense", "hybrid"] = "auto"
    """auto: hybrid (BM25 + dense, reciprocal-rank fusion) with an embedding_model, else bm25."""
    embedding_model: str | None = None
    """A local sentence-transformers or HF encoder folder for dense retrieval (mean/CLS pooling, normalized)."""
    fuse_collections: bool = True
    """Rank the pretraining corpus and index.sources separately and fuse the rankings (reciprocal rank, ties to
    index.sources): a few new documents are not outranked by a corpus that restates the old facts many times."""
    embed_batch_size: int = Field(default=64, ge=1)
    top_k: int = Field(default=5, ge=1, le=1000)
    """Chunks retrieved per question (evaluate's recall@k; serving and chat default)."""
    ann_min_rows: int = Field(default=100_000, ge=1)
    """Build an IVF-PQ vector index (approximate search) from this many chunks on; below it, exact search."""
    skip_malformed: bool = False
    """Skip (and count) malformed rows of index.sources instead of failing on the first one."""
    max_download_mb: int = Field(default=2048, ge=1)
    max_line_mb: float = Field(default=16, gt=0, le=1024)

    @model_validator(mode="after")
    def _chunks(self) -> IndexConfig:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be below chunk_tokens ({self.chunk_tokens})")
        if self.retrieval == "dense" and not self.embedding_model:
            raise ValueError("retrieval: dense needs embedding_model: a local encoder folder")
        if not self.sources and not self.include_pretrain:
            raise ValueError("nothing to index: add index.sources or set include_pretrain: true")
        return self
