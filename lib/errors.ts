/**
 * The failures a job can end in, besides the model's and Core's own errors
 * ({@linkcode LLMError}, {@linkcode CoreApiError}).
 *
 * @module
 */

/**
 * The job can never succeed (bad payload, missing image, unknown memory...): it is marked
 * `failed` at once, with no more attempts.
 */
export class JobFailedError extends Error {
  /** One plain sentence for the user, sent in the `llm_failure` notification. */
  readonly userMessage?: string;

  /** `message` goes to Core's `error_message`; `userMessage` to the user. */
  constructor(message: string, options: { userMessage?: string; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = "JobFailedError";
    this.userMessage = options.userMessage;
  }
}

/**
 * The model answered, but not usefully: no JSON where JSON is needed, or JSON that breaks the
 * job's schema. The job asks again, up to `LLM_MAX_RETRIES` attempts in all.
 */
export class InvalidAnswerError extends Error {
  /** The start of what the model said, for logs. */
  readonly answer: string;

  /** `message` says what was wrong; `answer` is the model's text. */
  constructor(message: string, answer: string) {
    super(message);
    this.name = "InvalidAnswerError";
    this.answer = answer.length > 500 ? `${answer.slice(0, 500)}…` : answer;
  }
}

/**
 * This replica no longer holds the user's lease (lib/user_lease.ts): another replica took the
 * user over while this one was paused or cut off. The job's run stops at once and writes nothing
 * more; the replica that holds the lease now runs the job.
 */
export class LeaseLostError extends Error {
  /** The user whose lease was lost. */
  readonly userId: string;

  /** `userId` is the user whose lease another replica holds now. */
  constructor(userId: string, message?: string) {
    super(message ?? `The lease of user ${userId} was taken over by another replica.`);
    this.name = "LeaseLostError";
    this.userId = userId;
  }
}
