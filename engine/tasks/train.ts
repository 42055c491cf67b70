// The train task (`swarmtune train`): wiring of model dir, tokenizer, data and backend into the Trainer,
// progress/JSON output and Ctrl-C handling.
import { openModelDir } from '../formats/model-dir.ts';
import { createBackend } from '../backends/registry.ts';
import type { BackendKind } from '../backends/registry.ts';
import { ConfigError } from '../train/config.ts';
import type { TrainConfig } from '../train/config.ts';
import { dataOptionsOf, loadDataset } from '../train/data.ts';
import { Trainer } from '../train/trainer.ts';
import type { StepEvent } from '../train/trainer.ts';
import type { TokenizedExample } from '../train/data.ts';

/** Model dir "tiny" = the embedded demo model; data "tiny" = its bundled QA set. */
async function resolveTiny(cfg: TrainConfig): Promise<{ model: string; data: string; evalData: string | null }> {
  if (!cfg.model) throw new ConfigError('--model is required (an HF model directory, or "tiny" for the embedded demo model)');
  if (!cfg.data) throw new ConfigError('--data is required (a JSONL file, or "tiny" for the bundled QA set)');
  let { model, data } = cfg as { model: string; data: string };
  let evalData = cfg.eval_data;
  if (model === 'tiny' || data === 'tiny' || evalData === 'tiny') {
    const tiny = await import('../tiny/index.ts');
    if (model === 'tiny') model = await tiny.ensureTinyModel();
    if (data === 'tiny') data = tiny.TINY_DATASET_PATH;
    if (evalData === 'tiny') evalData = tiny.TINY_DATASET_PATH;
  }
  return { model, data, evalData };
}

function fmtDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '?';
  const s = Math.round(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

function progressLine(e: StepEvent, totalSteps: number, elapsedMs: number, stepsDone: number): string {
  const width = 20;
  const filled = Math.round(width * e.step / totalSteps);
  const etaMs = stepsDone > 0 ? elapsedMs / stepsDone * (totalSteps - e.step) : Number.NaN;
  return `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] step ${e.step}/${totalSteps} | loss ${e.loss.toFixed(4)} | lr ${e.lr.toExponential(2)} | ${Math.round(e.tokens_per_s)} tok/s | ETA ${fmtDuration(etaMs)}`;
}

/** Train on one machine; resolves with the process exit code (0 done, 130 interrupted with a checkpoint saved). */
export async function runTrain(cfg: TrainConfig): Promise<number> {
  const { model, data, evalData } = await resolveTiny(cfg);
  const md = await openModelDir(model, { doubleQuant: cfg.bnb_4bit_use_double_quant });
  try {
    if (!md.tokenizer) throw new ConfigError(`${model}: no tokenizer.json; training needs the model's tokenizer`);
    const tok = md.tokenizer;
    const ds = loadDataset(data, tok, dataOptionsOf(cfg));
    const info = (line: string): void => {
      if (cfg.json) process.stderr.write(line + '\n');
      else process.stdout.write(line + '\n');
    };
    info(`data: ${ds.examples.length} examples from ${data}${ds.skipped.length ? `, ${ds.skipped.length} bad lines skipped` : ''}${ds.truncated ? `, ${ds.truncated} truncated at ${cfg.max_seq_length} tokens` : ''}`);
    let evalExamples: TokenizedExample[] | undefined;
    if (evalData !== null && cfg.eval_strategy === 'no') info(`note: eval_data ${evalData} is not evaluated during training: eval_strategy is "no" (set steps or epoch)`);
    if (evalData !== null && cfg.eval_strategy !== 'no') {
      // the same pipeline as the training data (masks, truncation); a bad line is an error unless skip_bad_lines
      const eds = loadDataset(evalData, tok, dataOptionsOf(cfg));
      evalExamples = eds.examples;
      info(`eval data: ${eds.examples.length} examples from ${evalData}${eds.skipped.length ? `, ${eds.skipped.length} bad lines skipped` : ''}${eds.truncated ? `, ${eds.truncated} truncated at ${cfg.max_seq_length} tokens` : ''}`);
    }
    const padId = tok.padTokenId ?? md.config.padTokenId ?? tok.eosTokenId;
    if (padId === null) throw new ConfigError(`${model}: tokenizer has neither a pad nor an eos token to pad micro-batches with`);
    const backend = await createBackend(cfg.device as BackendKind);
    const controller = new AbortController();
    let sigints = 0;
    const onSigint = (): void => {
      sigints++;
      if (sigints === 1) {
        process.stderr.write('\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to quit without saving)\n');
        controller.abort();
      } else process.exit(130);
    };
    process.on('SIGINT', onSigint);
    const tty = process.stderr.isTTY === true;
    let firstStep = -1;
    try {
      const trainer = new Trainer({
        config: cfg, modelConfig: md.config, weights: md.weights, backend, examples: ds.examples, evalExamples, padId, baseModelName: model,
      });
      const result = await trainer.run({
        info,
        signal: controller.signal,
        onStep: (e, p) => {
          if (firstStep < 0) firstStep = e.step - 1;
          if (cfg.json) {
            process.stdout.write(JSON.stringify({ event: 'step', step: e.step, loss: e.loss, lr: e.lr, grad_norm: e.grad_norm, tokens_per_s: e.tokens_per_s }) + '\n');
          }
          const line = progressLine(e, p.totalSteps, p.elapsedMs, e.step - firstStep);
          if (tty) process.stderr.write(`\r${line}\x1b[K${e.step === p.totalSteps ? '\n' : ''}`);
          else if (e.step % cfg.logging_steps === 0 || e.step === p.totalSteps) process.stderr.write(line + '\n');
        },
        onEval: (e) => {
          if (cfg.json) process.stdout.write(JSON.stringify(e) + '\n');
          process.stderr.write(`${tty ? '\n' : ''}eval at step ${e.step}: eval_loss ${e.eval_loss.toFixed(4)} (${e.eval_samples} samples, ${e.eval_tokens} tokens, ${e.eval_runtime.toFixed(2)} s)\n`);
        },
      });
      if (tty) process.stderr.write('\n');
      if (result.interrupted) {
        info(`interrupted at step ${result.globalStep}/${result.totalSteps}; checkpoint ${result.checkpoints.at(-1)} (resume with --resume-from-checkpoint)`);
        return 130;
      }
      if (result.best.best_model_checkpoint !== null) info(`best: ${cfg.metric_for_best_model ?? 'loss'} ${result.best.best_metric} at step ${result.best.best_global_step} (${result.best.best_model_checkpoint})${cfg.load_best_model_at_end ? '; the adapter is that checkpoint\'s' : ''}`);
      info(`done: ${result.globalStep} steps, final loss ${result.lastLoss.toFixed(4)}; adapter in ${result.adapterDir}`);
      return 0;
    } finally {
      process.off('SIGINT', onSigint);
      backend.dispose();
    }
  } finally {
    await md.close();
  }
}
