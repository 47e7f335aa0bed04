"""The README's two commands stay what CI and users run."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_command = next(b for b in blocks if "pytest" in b)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_main_job_runs_the_quickstart_with_microadam_and_an_adamw_baseline():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_job = next(b for b in blocks if "hf_ista.train" in b)
    recipe_path, accelerate_config = re.search(r"-m hf_ista.train (\S+)", main_job).group(1), \
        re.search(r"--config_file (\S+)", main_job).group(1)
    assert (ROOT / accelerate_config).is_file()
    recipe = yaml.safe_load((ROOT / recipe_path).read_text())
    assert recipe["optim"] == "microadam" and recipe["model_size"] == "tiny"
    assert [b["optim"] for b in recipe["hf_ista"]["baselines"]] == ["adamw_torch"]
