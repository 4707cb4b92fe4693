"""Load exported checkpoints with stock transformers only and compare with the Admin model's saved outputs.

Usage: python admin_stock_load.py MANIFEST.json   (written by tests/test_admin_export.py)
Each manifest entry: {"path", "auto_class", "outputs": [names], "generate": bool}; `path`/expected.pt holds the
inputs and the Admin model's outputs. Prints one JSON line with the errors; never imports hf_clinic.
"""

import json
import sys

import torch
import transformers


def main(manifest_path):
    with open(manifest_path) as f:
        manifest = json.load(f)
    results = {}
    for name, entry in manifest.items():
        model = getattr(transformers, entry["auto_class"]).from_pretrained(entry["path"]).eval()
        saved = torch.load(f"{entry['path']}/expected.pt", weights_only=True)
        with torch.no_grad():
            out = model(**saved["inputs"])
            errors = {}
            for key in entry["outputs"]:
                expected, got = saved[key], getattr(out, key)
                errors[key] = ((got - expected).abs().max() / expected.abs().max()).item()
            same_generation = None
            if entry["generate"]:
                generated = model.generate(saved["inputs"]["input_ids"], **entry["generate_kwargs"])
                same_generation = torch.equal(generated, saved["generated"])
        results[name] = {
            "class": type(model).__name__,
            "max_rel_error": errors,
            "same_generation": same_generation,
            "has_admin_config": hasattr(model.config, "admin"),
            "omega_params": [n for n, _ in model.named_parameters() if "admin" in n],
        }
    results["hf_clinic_imported"] = any(m == "hf_clinic" or m.startswith("hf_clinic.") for m in sys.modules)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
