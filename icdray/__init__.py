"""icdray: Ray-native training and serving of LLM medical coders (ICD-10-CM from discharge notes).

Modules in pipeline order: codes -> notes -> mimic -> demo_data -> prepare -> layout -> prompts -> chat
-> grammar -> evidence -> metrics -> results -> baseline -> teacher -> distill -> models -> training -> sft
-> engine -> grpo/ (rollout, rewards, algo, packing, masks, learner, loop) -> evaluate -> report -> pipeline.
Importing the package is cheap: heavy libraries (torch, vllm, deepspeed, google-genai,
simple-icd-10-cm) load inside the code that needs them.
"""

__version__ = "0.1.0"
