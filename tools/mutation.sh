#!/usr/bin/env bash
# Mutation testing of one critical module with mutmut 3 (pip install -e ".[dev]"); prints killed/total.
#
#   tools/mutation.sh MODULE [MAX_CHILDREN]     e.g. tools/mutation.sh lr_schedule
#   tools/mutation.sh list                      the modules and their source and test files
#
# Runs in a fresh scratch copy of the working tree (HYPERLIT_MUTATION_DIR, default /tmp/hyperlit-mutation/MODULE),
# so the checkout is never touched and changed tests always count (mutmut caches by source only). Only the tests
# mapped to MODULE below run (fast tests only: -m "not slow", set in pyproject's [tool.mutmut]). Too slow for .ci/run.
# Survivors: `cd $HYPERLIT_MUTATION_DIR && mutmut show NAME`; the last scores and their review are in docs/testing.md.
set -euo pipefail

main() {
declare -A SOURCES TESTS
# module           files to mutate (globs relative to the repo)             tests that guard them
SOURCES[lr_schedule]="hyperlit/lr_schedule.py"
TESTS[lr_schedule]="tests/test_lr_schedule.py tests/test_audit_schedule.py"
SOURCES[hypernetwork]="hyperlit/hypernetwork.py"
TESTS[hypernetwork]="tests/test_hypernetwork.py tests/test_a1111.py tests/test_attention.py tests/test_audit_hypernetwork.py
  tests/test_input_noise.py"
SOURCES[attention]="hyperlit/attention.py hyperlit/kv_inputs.py"
TESTS[attention]="tests/test_attention.py tests/test_shared_context.py tests/test_audit_attention.py"
SOURCES[loss]="hyperlit/tasks/hypernetwork/module.py"
TESTS[loss]="tests/test_task.py tests/test_audit_checkpoint.py tests/test_audit_task.py"
SOURCES[formats]="hyperlit/files/__init__.py hyperlit/files/a1111.py hyperlit/files/safetensors.py hyperlit/files/content.py
  hyperlit/files/pt_zip.py hyperlit/files/torch_file.py"
TESTS[formats]="tests/test_a1111.py tests/test_formats_cli.py tests/test_torch_file.py tests/test_audit_formats.py
  --deselect=tests/test_formats_cli.py::test_convert_as_subprocess_with_console_script"  # 11 s a subprocess; the same convert runs in process
SOURCES[caches]="hyperlit/data/cache.py hyperlit/data/records.py"
TESTS[caches]="tests/test_data_cache.py tests/test_audit_data.py tests/test_data_module.py tests/test_data_bad_input.py
  tests/test_audit_caches.py"
SOURCES[skips]="hyperlit/data/skips.py hyperlit/data/images.py hyperlit/data/pixels.py"
TESTS[skips]="tests/test_data_bad_input.py tests/test_audit_data.py tests/test_data_images.py tests/test_audit_images.py
  tests/test_audit_pixels.py
  tests/test_vae_data.py::test_counts_from_two_workers_reach_the_main_process_exactly
  tests/test_vae_data.py::test_a_file_failing_at_load_time_is_replaced_by_the_next_one
  tests/test_vae_data.py::test_scan_counts_small_and_bad_files tests/test_vae_data.py::test_crops_are_in_range_and_fixed_crops_repeat"
SOURCES[splits]="hyperlit/data/buckets.py hyperlit/data/webdata.py"
TESTS[splits]="tests/test_data_buckets.py tests/test_data_webdataset.py tests/test_audit_webdata.py tests/test_audit_buckets.py
  tests/test_audit_shards.py"
SOURCES[vae_losses]="hyperlit/vae/losses.py"
TESTS[vae_losses]="tests/test_vae_losses.py tests/test_audit_vae.py tests/test_vae_task.py::test_each_generator_term_moves_the_decoder_only
  tests/test_vae_task.py::test_full_generator_loss_has_adaptive_gan_term_and_no_d_grads
  tests/test_vae_task.py::test_no_adversarial_term_before_warmup_ends
  tests/test_vae_task.py::test_discriminator_step_does_not_touch_the_decoder"  # not the end-to-end fits: minutes each
SOURCES[ema]="hyperlit/callbacks/ema.py"
TESTS[ema]="tests/test_vae_ema.py tests/test_audit_ema.py"
SOURCES[fp16]="hyperlit/vae/fp16.py hyperlit/callbacks/fp16.py"
TESTS[fp16]="tests/test_audit_vae.py tests/test_vae_task.py::test_fp16_report_flags_overflowing_blocks"
# Issue 31: every module a user's result depends on that was not listed yet, and the modules of round two.
# `python train.py` subprocesses run from a temporary folder, where mutmut's trampolines find no config and fail
# every run (mutant or not); the same messages are checked in process (test_bad_input_is_one_line_and_exit_2 ...).
TRAIN_SUBPROCESSES="--deselect=tests/test_train_errors.py::test_the_command_line_prints_the_message_without_a_traceback
  --deselect=tests/test_bad_input_table.py::test_corrupt_files_from_the_command_line"
SOURCES[generate]="hyperlit/generate.py"
TESTS[generate]="tests/test_generate.py tests/test_guard_generate.py tests/test_audit_generate.py tests/test_generate_lora.py"
SOURCES[prompt_tags]="hyperlit/prompt_tags.py"
TESTS[prompt_tags]="tests/test_prompt_tags.py"
SOURCES[options]="hyperlit/options.py hyperlit/errors.py"
TESTS[options]="tests/test_train_errors.py tests/test_bad_input_table.py tests/test_guard_train_options.py
  tests/test_vae_config.py tests/test_vae_losses.py tests/test_config_mistakes.py tests/test_audit_options.py
  $TRAIN_SUBPROCESSES"
SOURCES[components]="hyperlit/models/components.py"
TESTS[components]="tests/test_models.py tests/test_sdxl_models.py tests/test_guard_sdxl_time_ids.py tests/test_audit_components.py
  tests/test_guard_cache_family.py tests/test_data_cache.py"
SOURCES[clients]="hyperlit/files/clients.py hyperlit/files/comfyui.py"
TESTS[clients]="tests/test_client_files.py tests/test_comfyui_verdict.py tests/test_export_callback.py
  tests/test_guard_inspect_clients.py tests/test_audit_clients.py"  # test_client_files.py is all slow: mutmut runs fast tests only
SOURCES[export]="hyperlit/callbacks/export.py"
TESTS[export]="tests/test_export_callback.py"
SOURCES[validation]="hyperlit/callbacks/validation.py hyperlit/data/heldout.py"
TESTS[validation]="tests/test_validation.py tests/test_data_heldout.py tests/test_guard_sdxl_time_ids.py
  tests/test_audit_validation.py"
SOURCES[preview]="hyperlit/callbacks/preview.py"
TESTS[preview]="tests/test_preview_grid.py tests/test_preview_taesd.py tests/test_audit_preview.py
  tests/test_audit_preview_outputs.py"
# colour.py is scored alone as vae_colour (below): not mutated again here.
SOURCES[vae_eval]="hyperlit/vae/evaluate.py hyperlit/vae/metrics.py hyperlit/vae/taesd_read.py hyperlit/vae/taesd_eval.py"
TESTS[vae_eval]="tests/test_vae_eval.py tests/test_audit_vae_eval.py tests/test_eval_vae_taesd.py tests/test_eval_vae_reference.py tests/test_guard_eval_inf_psnr.py tests/test_guard_colour_shift.py
  tests/test_guard_rfid_models.py tests/test_guard_colour_stats.py"
SOURCES[vae_colour]="hyperlit/vae/colour.py"  # the small part of vae_eval, scored alone on a busy machine
TESTS[vae_colour]="tests/test_guard_colour_shift.py tests/test_guard_colour_stats.py tests/test_vae_eval.py::test_colour_statistics_values"
SOURCES[fp16_fix]="hyperlit/vae/fp16_fix.py"
TESTS[fp16_fix]="tests/test_vae_fp16_fix.py tests/test_guard_train_options.py tests/test_audit_fp16_fix.py"
SOURCES[build]="hyperlit/tasks/hypernetwork/build.py hyperlit/tasks/vae/build.py hyperlit/tasks/taesd/build.py"
TESTS[build]="tests/test_task.py tests/test_train_errors.py tests/test_guard_train_options.py tests/test_vae_config.py
  tests/test_bad_input_table.py tests/test_taesd_errors.py tests/test_configs.py tests/test_audit_build.py
  tests/test_taesd_task.py::test_sixteen_channel_vae_trains_end_to_end_from_config
  tests/test_taesd_task.py::test_the_vae_must_downsample_by_eight
  $TRAIN_SUBPROCESSES"  # the two taesd tests: the only fast ones that call build()'s load_module
SOURCES[vae_module]="hyperlit/tasks/vae/module.py"
TESTS[vae_module]="tests/test_audit_vae_task.py tests/test_audit_vae_fp16_task.py tests/test_audit_vae.py
  tests/test_guard_vae_sampling.py tests/test_guard_train_options.py
  tests/test_vae_task.py::test_each_generator_term_moves_the_decoder_only
  tests/test_vae_task.py::test_full_generator_loss_has_adaptive_gan_term_and_no_d_grads
  tests/test_vae_task.py::test_discriminator_step_does_not_touch_the_decoder
  tests/test_vae_task.py::test_no_adversarial_term_before_warmup_ends
  tests/test_vae_task.py::test_posterior_is_cached_once_per_image
  tests/test_vae_task.py::test_missing_perceptual_model_is_a_clear_error"
# Not test_vae_task.py's four Trainer fits: 8-35 s a mutant (a mutant that stops the step count runs to the timeout),
# ~5 mutants a minute on one core; test_audit_vae_task.py and test_audit_vae_fp16_task.py check the same hooks with a
# stand-in trainer. Not the fp16 files either: their fast tests never call this module (only the slow fits do).
SOURCES[kv_inputs]="hyperlit/kv_inputs.py"  # also part of attention; alone it runs in a fraction of the time
TESTS[kv_inputs]="tests/test_shared_context.py tests/test_audit_attention.py tests/test_attention.py"
SOURCES[styles]="hyperlit/demo/styles*.py hyperlit/demo/style_*.py"
TESTS[styles]="tests/test_styles.py tests/test_style_eye_labels.py tests/test_style_looks_exact.py
  tests/test_style_judges_exact.py"
SOURCES[lora]="hyperlit/lora/*.py"
TESTS[lora]="tests/test_audit_lora.py tests/test_lora.py tests/test_generate_lora.py"
# (the fast tests written for hyperlit.lora; not test_learning_proof.py or the style suite's --lora test, which
# also run to-lora but train and judge first: with them a run made ~2-3 mutants a minute on one core)
SOURCES[taesd]="hyperlit/tasks/taesd/*.py"
TESTS[taesd]="tests/test_taesd_task.py tests/test_taesd_errors.py tests/test_taesd_layout.py tests/test_taesd_scenes.py
  tests/test_taesd_augment.py tests/test_audit_taesd.py tests/test_audit_build.py"  # test_audit_build: build.py's checks

usage() { echo "usage: $0 MODULE [MAX_CHILDREN] | list; modules: ${!SOURCES[*]}" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
if [[ $1 == list ]]; then
    for m in $(printf '%s\n' "${!SOURCES[@]}" | sort); do printf '%-13s %s\n%-13s   tests: %s\n' "$m" "${SOURCES[$m]}" "" "${TESTS[$m]}"; done
    exit 0
fi
module=$1
[[ -n ${SOURCES[$module]:-} ]] || usage
children=${2:-1}  # machines running this are often shared: one pytest at a time unless told otherwise
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${HYPERLIT_MUTATION_DIR:-/tmp/hyperlit-mutation/$module}
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install -e '.[dev]'" >&2; exit 2; }

# A fresh copy of the working tree (tracked and new files, not ignored ones).
rm -rf "$work"
mkdir -p "$work"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$repo" && xargs -0 tar -cf - --ignore-failed-read 2>/dev/null) | tar -xf - -C "$work"
# Modules of a later round may not be on this branch yet: keep the files and tests that exist (globs expanded
# here, so mutmut gets plain paths), say what is missing, and stop only if no source file is left.
sources=() tests=() missing=()
for pattern in ${SOURCES[$module]}; do
    found=$(cd "$work" && compgen -G "$pattern" || true)
    if [[ -n $found ]]; then sources+=($found); else missing+=("$pattern"); fi
done
for t in ${TESTS[$module]}; do
    if [[ $t == -* || -e $work/${t%%::*} ]]; then tests+=("$t"); else missing+=("$t"); fi
done
[[ ${#missing[@]} -eq 0 ]] || echo "$module: not on this branch, skipped: ${missing[*]}" >&2
[[ ${#sources[@]} -gt 0 ]] || { echo "$module: none of its source files exist here" >&2; exit 2; }
[[ ${#tests[@]} -gt 0 ]] || { echo "$module: none of its tests exist here" >&2; exit 2; }
python - "$work/pyproject.toml" "${sources[*]}" "${tests[*]}" <<'PY'
import json, re, sys
path, sources, tests = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
text = open(path, encoding="utf-8").read()
text = re.sub(r"(?m)^only_mutate = .*$", "only_mutate = " + json.dumps(sources), text)
text = re.sub(r"(?m)^pytest_add_cli_args_test_selection = .*$",
              "pytest_add_cli_args_test_selection = " + json.dumps(tests), text)
open(path, "w", encoding="utf-8").write(text)
PY

cd "$work"
# The tests must import the mutated copy, not this checkout (mutmut puts mutants/ first on sys.path).
unset PYTHONPATH
export WANDB_MODE=disabled HF_HUB_OFFLINE=1
# mutmut forks each mutant's pytest from a process that already ran torch: a multi-threaded OpenMP pool does not
# survive fork (the child hangs), so torch runs single-threaded here.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# Every mutant's pytest session makes a new numbered /tmp/pytest-of-USER/pytest-N (tens of MB with the model files
# the tests write) and the forked sessions leave them all (vae_eval: 465 folders, 22 GB, until the disk was full).
# One mutant at a time can reuse one folder, which pytest empties at each session start.
[[ $children -ne 1 ]] || export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} --basetemp=$work-pytest-tmp"
started=$(date -u +%FT%TZ)
mutmut run --max-children "$children" >mutmut-run.log 2>&1 || { tail -40 mutmut-run.log; exit 1; }
mutmut export-cicd-stats >/dev/null
python - "$module" "$started" "${sources[*]}" <<'PY'
import json, sys
module, started, sources = sys.argv[1], sys.argv[2], sys.argv[3]
s = json.load(open("mutants/mutmut-cicd-stats.json"))
killed = s["killed"] + s["timeout"]  # a mutant that hangs the tests is caught too
total = s["total"] - s["skipped"]
score = 100.0 * killed / total if total else 0.0
print(f"{module}: {killed}/{total} killed ({score:.1f}%)  survived={s['survived']} no_tests={s['no_tests']} "
      f"timeout={s['timeout']} suspicious={s['suspicious']}  [{sources}; started {started}]")
PY
echo "survivors (mutmut show NAME in $work):"
mutmut results | grep -v ": killed" || true
}

# Bash reads a script as it runs; the whole body is one function, so it is parsed before anything runs and
# editing this file during a (long) run cannot change that run.
main "$@"
