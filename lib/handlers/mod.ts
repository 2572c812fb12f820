/**
 * The five job handlers, by job type.
 *
 * @module
 */
import { emailExtractHandler } from "./email_extract.ts";
import { followupHandler } from "./followup.ts";
import { imageTagHandler } from "./image_tag.ts";
import { intentClassifyHandler } from "./intent_classify.ts";
import { taskMatchHandler } from "./task_match.ts";
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
