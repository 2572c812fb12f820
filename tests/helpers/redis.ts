/**
 * A private `redis-server` on a free loopback port, so a test can stop and restart Redis (the
 * implementation lives in `dev/redis_server.ts`, shared with the local stack).
 *
 * @module
 */
export { freePort, type PrivateRedis, startRedis } from "../../dev/redis_server.ts";
