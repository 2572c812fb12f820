/**
 * Running a job to its end as docs/protocol.md section 4 says (PATCH, notify, XACK): the handler,
 * the retries of invalid answers (counted against `LLM_MAX_RETRIES`), the waits for an unavailable
 * model server or Core (not counted), the failures, and dead letters for malformed entries.
 *
 * It knows nothing of reading streams: it is given {@linkcode WorkItem}s and a
 * {@linkcode JobStore} (the ledger, or any stand-in), and says when an item is over through
 * `release`.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import type { Settings } from "./config.ts";
import { type CoreApiClient, CoreApiError } from "./core_api.ts";
import { InvalidAnswerError, JobFailedError, LeaseLostError } from "./errors.ts";
import { HANDLERS } from "./handlers/mod.ts";
import type { HandlerResult, JobHandler } from "./handlers/types.ts";
import type { Job, JobType } from "./job.ts";
import type { JobLedger } from "./ledger.ts";
import { LLMError } from "./llm.ts";
import { describeError, logger, withJobContext } from "./log.ts";
import type { ModelAvailability, ModelGateway } from "./model.ts";
import { entryTimeMs, expiresAt, RetryTracker, unavailableDelayMs } from "./retry.ts";
import type { RunOutcome } from "./scheduler.ts";
import { traceJob } from "./tracing.ts";
import type { Ending, WorkItem } from "./work_item.ts";

/**
 * How a job's run ended, as reported to {@linkcode ConsumerEvents}: the job ended
 * ({@linkcode ENDED_OUTCOMES}), or it will run again (`retry_*`; `abandoned` by a stop;
 * `lease_lost` on the replica that holds the user now).
 * `unrecorded`: the job ended but Core refused its final update (e.g. Core does not know it).
 */
export type JobOutcome =
  | "completed"
  | "failed"
  | "unrecorded"
  | "skipped"
  | "retry_invalid"
  | "retry_unavailable"
  | "retry_error"
  | "abandoned"
  | "lease_lost";

/** The outcomes that end a job: its entry is acknowledged. */
export const ENDED_OUTCOMES: readonly JobOutcome[] = [
  "completed",
  "failed",
  "unrecorded",
  "skipped",
];

/** Observers of the consumer (metrics, tests). All optional; none may throw. */
export interface ConsumerEvents {
  /**
   * A job run starts. `attempt` is the one counted against `LLM_MAX_RETRIES` (1-based): waits for
   * an unavailable model server or Core do not raise it.
   */
  jobStarted?(job: Job, attempt: number): void;
  /** A job run ended. */
  jobEnded?(job: Job, outcome: JobOutcome, durationMs: number): void;
  /** A malformed entry was copied to `llm:dead`. */
  deadLettered?(stream: string, reason: string): void;
}

/** What the runner needs of the job ledger (see {@linkcode JobLedger}). */
export type JobStore = Pick<
  JobLedger,
  | "load"
  | "effects"
  | "countInvalid"
  | "countUnavailable"
  | "setOnce"
  | "saveOutbox"
  | "finish"
  | "notifyOnce"
  | "ack"
>;

/** Options of {@linkcode JobRunner}. */
export interface JobRunnerOptions {
  /** The worker's settings. */
  settings: Settings;
  /** The job ledger. */
  ledger: JobStore;
  /** Core's REST API. */
  core: CoreApiClient;
  /** The model. */
  model: ModelGateway;
  /** Whether the model server answers (a job waiting for it wakes when it is back). */
  health: Pick<ModelAvailability, "nextRecovery">;
  /** Handlers by job type (default: the five of `lib/handlers`). */
  handlers?: Readonly<Record<JobType, JobHandler>>;
  /** Observers. */
  events?: ConsumerEvents;
  /** The clock in ms (default `Date.now`). */
  now?: () => number;
  /** Copies a malformed entry to the dead-letter stream and acknowledges it. */
  moveToDead: (item: WorkItem, reason: string) => Promise<unknown>;
  /** Told when an item is over (ended, skipped or dead-lettered): it is no longer held. */
  release: (item: WorkItem) => void;
  /** Aborted when the drain time is over: jobs still running are cut short. */
  signal?: AbortSignal;
  /** The ledger for an item: fenced by its user's lease (default: `ledger`). */
  storeFor?: (item: WorkItem) => JobStore;
  /** Checks the item's lease before a model request or a Core effect; none for nobody's jobs. */
  guard?: (item: WorkItem) => (() => Promise<void>) | undefined;
  /** After an item ended (acknowledged): hands its user on to the user's next job. */
  handOn?: (item: WorkItem) => Promise<void>;
}

/**
 * Runs jobs to their end.
 *
 * @example
 * ```ts ignore
 * const runner = new JobRunner({ settings, ledger, core, model, health,
 *   moveToDead: async () => {}, release: () => {} });
 * const retry = await runner.run(workItem("llm:followup", "1-0", fields, false));
 * ```
 */
export class JobRunner {
  readonly #s: Settings;
  readonly #ledger: JobStore;
  readonly #core: CoreApiClient;
  readonly #model: ModelGateway;
  readonly #health: Pick<ModelAvailability, "nextRecovery">;
  readonly #handlers: Readonly<Record<JobType, JobHandler>>;
  readonly #events: ConsumerEvents;
  readonly #now: () => number;
  readonly #moveToDead: (item: WorkItem, reason: string) => Promise<unknown>;
  readonly #release: (item: WorkItem) => void;
  readonly #signal: AbortSignal;
  readonly #storeFor: (item: WorkItem) => JobStore;
  readonly #guard: (item: WorkItem) => (() => Promise<void>) | undefined;
  readonly #handOn: (item: WorkItem) => Promise<void>;
  readonly #tracker: RetryTracker;
  readonly #log: Logger = logger("consumer");

  /** Creates the runner. */
  constructor(options: JobRunnerOptions) {
    this.#s = options.settings;
    this.#ledger = options.ledger;
    this.#core = options.core;
    this.#model = options.model;
    this.#health = options.health;
    this.#handlers = options.handlers ?? HANDLERS;
    this.#events = options.events ?? {};
    this.#now = options.now ?? Date.now;
    this.#moveToDead = options.moveToDead;
    this.#release = options.release;
    this.#signal = options.signal ?? new AbortController().signal;
    const ledger = options.ledger;
    this.#storeFor = options.storeFor ?? (() => ledger);
    this.#guard = options.guard ?? (() => undefined);
    this.#handOn = options.handOn ?? (() => Promise.resolve());
    this.#tracker = new RetryTracker(this.#s.llmMaxRetries);
  }

  /**
   * Runs one entry: a job to its end (or to its next try), a malformed entry to the dead-letter
   * stream. Never throws: an unexpected error is logged and the entry tried again in 5 s.
   */
  async run(item: WorkItem): Promise<RunOutcome> {
    if (!item.parsed.ok) {
      try {
        await this.#guard(item)?.();
      } catch (error) {
        if (!(error instanceof LeaseLostError)) throw error;
        return this.#leaseLost(item, error);
      }
      return await this.#deadLetter(item, item.parsed);
    }
    const job = item.parsed.job;
    const started = performance.now();
    let outcome: JobOutcome = "retry_error";
    try {
      const context = { jobId: job.jobId, jobType: job.jobType, userId: job.userId };
      const result = await withJobContext(
        context,
        () => traceJob(job, () => this.#runJob(item, job)),
      );
      outcome = result.outcome;
      if (ENDED_OUTCOMES.includes(outcome)) {
        this.#release(item);
        this.#tracker.clear(job.jobId);
        await this.#handOn(item);
      }
      return result.retry;
    } catch (error) {
      if (error instanceof LeaseLostError) {
        outcome = "lease_lost";
        return this.#leaseLost(item, error);
      }
      // Redis unreachable while ending the job, or a bug: try again later, nothing acknowledged.
      this.#log.error(
        "Job {jobId} ({jobType}) hit an unexpected error: {message}. It will be retried.",
        {
          jobId: job.jobId,
          jobType: job.jobType,
          message: describeError(error),
        },
      );
      return { retryInMs: 5_000 };
    } finally {
      const durationMs = performance.now() - started;
      this.#events.jobEnded?.(job, outcome, durationMs);
      const level = outcome === "failed" ? "warn" : "info";
      this.#log[level](
        "Job {jobId} ({jobType}) for user {userId} ended: {outcome} in {durationMs} ms (attempt {attempt} of {maxAttempts}, after {waits} wait(s)); {promptTokens} prompt and {completionTokens} completion tokens.",
        {
          jobId: job.jobId,
          jobType: job.jobType,
          userId: job.userId,
          outcome,
          durationMs: Math.round(durationMs),
          attempt: item.run?.attempt ?? this.#attempt(item),
          maxAttempts: this.#tracker.maxRetries,
          waits: item.run?.waits ?? item.record?.unavailableAttempts ?? 0,
          promptTokens: item.usage.promptTokens,
          completionTokens: item.usage.completionTokens,
        },
      );
    }
  }

  async #runJob(item: WorkItem, job: Job): Promise<{ outcome: JobOutcome; retry?: RunOutcome }> {
    if (this.#signal.aborted) return { outcome: "abandoned" };
    const log = this.#log.with({ jobId: job.jobId, jobType: job.jobType, userId: job.userId });
    const store = this.#storeFor(item);
    try {
      await this.#guard(item)?.();
      if (!item.record) {
        item.record = await store.load(job.jobId);
        item.effects = store.effects(job.jobId, item.record, this.#guard(item));
        if (item.record.done) {
          await store.ack(job);
          log.debug(
            "Job {jobId} had ended here already ({status}); entry {entryId} acknowledged.",
            {
              status: item.record.done,
              entryId: job.entryId,
            },
          );
          return { outcome: "skipped" };
        }
        if (item.redelivered || item.record.exists) {
          const skipped = await this.#skipIfFinishedInCore(item, job);
          if (skipped) return { outcome: "skipped" };
        }
      }
    } catch (error) {
      if (error instanceof LeaseLostError) throw error;
      return this.#onRunError(item, job, error, log);
    }
    const run = { attempt: this.#attempt(item), waits: item.record.unavailableAttempts };
    item.run = run;
    return await withJobContext(run, async () => {
      try {
        this.#events.jobStarted?.(job, run.attempt);
        const values = { ...run, maxAttempts: this.#tracker.maxRetries };
        if (run.waits === 0) {
          log.info(
            "Job {jobId} ({jobType}) for user {userId} started: attempt {attempt} of {maxAttempts}.",
            values,
          );
        } else {
          log.info(
            "Job {jobId} ({jobType}) for user {userId} started: attempt {attempt} of {maxAttempts}, after {waits} wait(s) for the model server or Core (waits are not attempts).",
            values,
          );
        }
        item.ending ??= await this.#decide(item, job, log);
        if (!item.ending) return { outcome: "abandoned" };
        return { outcome: await this.#end(item, job, item.ending, log) };
      } catch (error) {
        if (error instanceof LeaseLostError) throw error;
        return this.#onRunError(item, job, error, log);
      }
    });
  }

  /** Runs the handler, or decides a failure without it; `undefined` when the stop cut it short. */
  async #decide(item: WorkItem, job: Job, log: Logger): Promise<Ending | undefined> {
    const handler = this.#handlers[job.jobType];
    if (this.#now() >= expiresAt(entryTimeMs(job.entryId))) {
      return this.#failure(job, "The job expired: it was queued more than 14 days ago.");
    }
    if (handler.requiresUser && job.userId === null) {
      return this.#failure(
        job,
        `A ${job.jobType} job acts for an owner, but its user_id is null; the producer must send the user.`,
      );
    }
    const payload = handler.payloadSchema.safeParse(job.payload);
    if (!payload.success) {
      const issues = payload.error.issues.slice(0, 5).map((i) =>
        `${i.path.join(".") || "payload"}: ${i.message}`
      );
      return this.#failure(job, `The ${job.jobType} payload is invalid: ${issues.join("; ")}.`);
    }
    let result: HandlerResult;
    try {
      result = await handler.run({
        job,
        core: this.#core,
        model: this.#model.forJob(job.jobType, {
          answers: item.answers,
          log,
          usage: item.usage,
          guard: this.#guard(item),
        }),
        effects: item.effects!,
        settings: this.#s,
        now: () => new Date(this.#now()),
        signal: this.#signal,
        log,
      }, payload.data);
    } catch (error) {
      if (this.#signal.aborted) return undefined;
      throw error;
    }
    return {
      status: "completed",
      result: result.result,
      notifications: job.userId === null
        ? []
        : result.notifications.map((n) => ({ user_id: job.userId!, ...n })),
    };
  }

  /**
   * Writes the end of a job: outbox, Core's PATCH, then notifications + XACK at once. Resolves
   * with the job's outcome: its status, or `unrecorded` when Core refused the PATCH for good.
   */
  async #end(
    item: WorkItem,
    job: Job,
    ending: Ending,
    log: Logger,
  ): Promise<"completed" | "failed" | "unrecorded"> {
    const store = this.#storeFor(item);
    if (ending.notifications.length > 0) {
      await store.saveOutbox(job.jobId, ending.notifications);
    }
    await this.#guard(item)?.();
    let outcome: "completed" | "failed" | "unrecorded" = ending.status;
    try {
      await this.#core.updateJob(
        job.jobId,
        ending.status === "completed"
          ? { status: "completed", result: ending.result }
          : { status: "failed", error_message: ending.errorMessage },
        this.#signal,
      );
    } catch (error) {
      if (!(error instanceof CoreApiError) || error.retryable) throw error;
      // Core can never take this update (e.g. it does not know the job): say so, end it anyway.
      outcome = "unrecorded";
      log.warn(
        "Job {jobId} ({jobType}) {status}, but its result could not be recorded in Core: {why}. The entry is acknowledged; the job counts as unrecorded.",
        {
          status: ending.status,
          why: error.status === 404
            ? "Core does not know the job (404 to the final PATCH)"
            : `Core refused the final PATCH with ${error.status}: ${error.body}`,
          coreStatus: error.status,
          errorMessage: ending.errorMessage,
        },
      );
    }
    await store.finish(job, ending.status, ending.notifications);
    log.debug(
      "Job {jobId}: entry {entryId} of {stream} acknowledged, {notifications} notification(s) sent.",
      { entryId: job.entryId, stream: job.stream, notifications: ending.notifications.length },
    );
    if (outcome === "failed") {
      log.warn("Job {jobId} ({jobType}) failed: {reason}", { reason: ending.errorMessage });
    }
    return outcome;
  }

  /** A redelivered job that Core already shows as ended is acknowledged, not redone. */
  async #skipIfFinishedInCore(item: WorkItem, job: Job): Promise<boolean> {
    let status: string;
    try {
      status = (await this.#core.getJob(job.jobId, this.#signal)).status;
    } catch (error) {
      if (!(error instanceof CoreApiError && error.status === 404)) throw error;
      // Core does not know the job: nothing it could ever take, so the handler does not run.
      item.ending = this.#failure(job, `Core does not know job ${job.jobId} (404).`);
      return false;
    }
    if (status !== "completed" && status !== "failed") return false;
    // Crashed after Core's PATCH but before the notifications: send what was saved.
    await this.#storeFor(item).finish(job, status, item.record?.outbox ?? []);
    this.#log.info("Job {jobId} was already {status} in Core; acknowledged without redoing it.", {
      jobId: job.jobId,
      status,
    });
    return true;
  }

  async #onRunError(
    item: WorkItem,
    job: Job,
    error: unknown,
    log: Logger,
  ): Promise<{ outcome: JobOutcome; retry?: RunOutcome }> {
    if (this.#signal.aborted) return { outcome: "abandoned" };
    let ending: Ending | undefined;
    if (error instanceof InvalidAnswerError) {
      // The handler may refuse an answer the gateway found valid (and kept): ask afresh.
      item.answers.done.clear();
      this.#tracker.restore(job.jobId, await this.#storeFor(item).countInvalid(job.jobId));
      item.record!.invalidAttempts = this.#tracker.attempts(job.jobId);
      if (this.#tracker.shouldRetry(job.jobId)) {
        const delay = this.#tracker.backoffSeconds(job.jobId) * 1000;
        await this.#markProcessing(item, job, log);
        log.warn(
          "Job {jobId}: invalid model answer at attempt {attempt} of {maxAttempts} ({reason}); attempt {next} in {delay} ms.",
          {
            attempt: item.record!.invalidAttempts,
            maxAttempts: this.#tracker.maxRetries,
            next: item.record!.invalidAttempts + 1,
            reason: error.message,
            delay,
            answer: error.answer,
          },
        );
        const wake = this.#lostWake(item);
        return {
          outcome: "retry_invalid",
          retry: wake ? { retryInMs: delay, wake } : { retryInMs: delay },
        };
      }
      ending = this.#failure(
        job,
        `The model gave no valid answer in ${this.#tracker.maxRetries} attempts; last problem: ${error.message}`,
      );
    } else if (isUnavailable(error)) {
      return { outcome: "retry_unavailable", retry: await this.#wait(item, job, error, log) };
    } else if (error instanceof JobFailedError) {
      ending = this.#failure(job, error.message, error.userMessage);
    } else if (error instanceof LLMError) {
      ending = this.#failure(
        job,
        `The model server refused the request (check LLM_TEXT_MODEL / LLM_VISION_MODEL and LLM_API_KEY): ${error.message}`,
      );
    } else if (error instanceof CoreApiError) {
      ending = this.#failure(job, `Core refused a call the job needs: ${error.message}`);
    } else {
      throw error;
    }
    item.ending = ending;
    try {
      return { outcome: await this.#end(item, job, ending, log) };
    } catch (endError) {
      if (isUnavailable(endError)) {
        return { outcome: "retry_unavailable", retry: await this.#wait(item, job, endError, log) };
      }
      throw endError;
    }
  }

  /** Schedules the next try of a job that met an unavailable model server or Core. */
  async #wait(
    item: WorkItem,
    job: Job,
    error: LLMError | CoreApiError,
    log: Logger,
  ): Promise<RunOutcome> {
    const count = await this.#storeFor(item).countUnavailable(job.jobId);
    item.record!.unavailableAttempts = count;
    const fromModel = error instanceof LLMError;
    if (fromModel) {
      await this.#markProcessing(item, job, log);
      if (job.userId !== null) {
        // The flag and the notice in one step: a retry, or a command sent again after a lost
        // connection, never tells the user twice.
        await this.#storeFor(item).notifyOnce(job.jobId, "told", {
          user_id: job.userId,
          message_type: "llm_failure",
          content: {
            job_type: job.jobType,
            memory_id: memoryIdOf(job),
            message:
              "The assistant's language model is unavailable right now; your request is saved and will run when it is back.",
          },
        });
      }
    }
    let delay = unavailableDelayMs(
      count,
      error instanceof LLMError ? error.retryAfterMs : undefined,
    );
    const left = expiresAt(entryTimeMs(job.entryId)) - this.#now();
    delay = Math.max(0, Math.min(delay, left)); // at expiry the next run gives up
    log.warn(
      "Job {jobId} waits {delay} ms (wait {waits}, not counted against LLM_MAX_RETRIES): {reason}",
      { delay, waits: count, reason: error.message },
    );
    const lost = this.#lostWake(item);
    const wake = fromModel ? this.#health.nextRecovery() : undefined;
    const either = wake && lost ? Promise.race([wake, lost]) : wake ?? lost;
    return either ? { retryInMs: delay, wake: either } : { retryInMs: delay };
  }

  /** Resolves when the lease of a waiting job is found lost (none for a job of nobody). */
  #lostWake(item: WorkItem): Promise<void> | undefined {
    if (!item.lease) return undefined;
    item.lostWake ??= Promise.withResolvers<void>();
    return item.lostWake.promise;
  }

  /** A job whose lease was lost stops here: nothing more is written, nothing retried. */
  #leaseLost(item: WorkItem, error: LeaseLostError): void {
    this.#release(item);
    this.#log.warn(
      "Entry {entryId} of {stream} stops here: {message} That replica runs it now.",
      { entryId: item.entryId, stream: item.stream, message: error.message },
    );
  }

  /** A job that waits is `processing` in Core; told once per job (best effort: Core may be down). */
  async #markProcessing(item: WorkItem, job: Job, log: Logger): Promise<void> {
    if (!await this.#storeFor(item).setOnce(job.jobId, "processing")) return;
    await this.#core.updateJob(job.jobId, { status: "processing" }).catch((e) =>
      log.debug("Could not mark job {jobId} processing: {message}", { message: describeError(e) })
    );
  }

  #failure(job: Job, errorMessage: string, userMessage?: string): Ending {
    return {
      status: "failed",
      result: null,
      errorMessage,
      notifications: job.userId === null ? [] : [{
        user_id: job.userId,
        message_type: "llm_failure",
        content: {
          job_type: job.jobType,
          memory_id: memoryIdOf(job),
          message: userMessage ?? USER_FAILURE_MESSAGES[job.jobType],
        },
      }],
    };
  }

  /** Copies a malformed entry to `llm:dead`, marks its job failed when it names one, then acks. */
  async #deadLetter(
    item: WorkItem,
    parsed: { reason: string; jobId?: string },
  ): Promise<RunOutcome> {
    const reason = `malformed job entry: ${parsed.reason}`;
    try {
      if (parsed.jobId) {
        await this.#core.updateJob(parsed.jobId, { status: "failed", error_message: reason }).catch(
          (error) => {
            if (error instanceof CoreApiError && !error.retryable) {
              this.#log.warn("Core refused to mark job {jobId} failed: {message}", {
                jobId: parsed.jobId,
                message: error.message,
              });
            } else throw error;
          },
        );
      }
      await this.#moveToDead(item, reason);
    } catch (error) {
      this.#log.warn("Could not dead-letter entry {id} of {stream} yet: {message}", {
        id: item.entryId,
        stream: item.stream,
        message: describeError(error),
      });
      return { retryInMs: 5_000 };
    }
    this.#release(item);
    await this.#handOn(item);
    this.#events.deadLettered?.(item.stream, parsed.reason);
    this.#log.warn("Entry {id} of {stream} moved to llm:dead: {reason}", {
      id: item.entryId,
      stream: item.stream,
      reason: parsed.reason,
    });
  }

  /** The attempt counted against `LLM_MAX_RETRIES`: invalid answers so far, plus one. */
  #attempt(item: WorkItem): number {
    return 1 + (item.record?.invalidAttempts ?? 0);
  }
}

/** One plain sentence per job type for a job that gave up. */
const USER_FAILURE_MESSAGES: Record<JobType, string> = {
  image_tag: "Sorry, I couldn't describe and tag your photo.",
  intent_classify: "Sorry, I couldn't understand that message; please try rephrasing it.",
  followup: "Sorry, I couldn't come up with a follow-up question.",
  task_match: "Sorry, I couldn't check whether your note matches one of your tasks.",
  email_extract: "Sorry, I couldn't read the events in that email.",
};

function memoryIdOf(job: Job): string {
  const id = job.payload.memory_id;
  return typeof id === "string" ? id : "";
}

function isUnavailable(error: unknown): error is LLMError | CoreApiError {
  return (error instanceof LLMError && error.kind === "unavailable") ||
    (error instanceof CoreApiError && error.retryable);
}
