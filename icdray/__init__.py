"""icdray: Ray-native training and serving of LLM medical coders (ICD-10-CM from discharge notes).

Modules in pipeline order: codes -> notes -> mimic -> demo_data -> prepare -> prompts -> evidence ->
metrics -> baseline -> teacher -> distill -> models -> sft -> evaluate. Importing the package is cheap:
heavy libraries (torch, deepspeed, google-genai, simple-icd-10-cm) load inside the code that needs them.
"""

__version__ = "0.1.0"
