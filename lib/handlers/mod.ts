/**
 * The five job handlers, by job type.
 *
 * @module
 */
import type { PromptTemplate } from "../prompts.ts";
import { EMAIL_PROMPT, emailExtractHandler } from "./email_extract.ts";
import { FOLLOWUP_PROMPT, followupHandler } from "./followup.ts";
import { IMAGE_TAG_PROMPT, imageTagHandler } from "./image_tag.ts";
import { INTENT_PROMPT, intentClassifyHandler } from "./intent_classify.ts";
import { TASK_MATCH_PROMPT, taskMatchHandler } from "./task_match.ts";
import type { JobType } from "../job.ts";
import type { JobHandler } from "./types.ts";

/** The handler of each job type. */
export const HANDLERS: Readonly<Record<JobType, JobHandler>> = {
  image_tag: imageTagHandler as JobHandler,
  intent_classify: intentClassifyHandler as JobHandler,
  followup: followupHandler as JobHandler,
  task_match: taskMatchHandler as JobHandler,
  email_extract: emailExtractHandler as JobHandler,
};

/** The built-in prompt of each job type (a file in `LLM_PROMPTS_DIR` replaces one). */
export const BUILT_IN_PROMPTS: Readonly<Record<JobType, PromptTemplate>> = {
  image_tag: IMAGE_TAG_PROMPT,
  intent_classify: INTENT_PROMPT,
  followup: FOLLOWUP_PROMPT,
  task_match: TASK_MATCH_PROMPT,
  email_extract: EMAIL_PROMPT,
};
