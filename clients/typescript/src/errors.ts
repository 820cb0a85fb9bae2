/**
 * `errorInfo()`: the contract's error reason of a failed call. The gateway attaches a `google.rpc.Status`
 * to every error, in the `grpc-status-details-bin` trailer; its `google.rpc.ErrorInfo` detail carries the
 * reason (e.g. `WRONG_EXPECTED_VERSION`), the domain (`kpg`) and reason-specific metadata.
 */
import type { ServiceError } from "@grpc/grpc-js";

import { ErrorInfo } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";

/** The `ErrorInfo.domain` of every kpg.v1 error. */
export const ERROR_DOMAIN = "kpg";

const STATUS_DETAILS_KEY = "grpc-status-details-bin";
const ERROR_INFO_TYPE = "google.rpc.ErrorInfo";

/** Whether `error` is what a failed grpc-js call rejects with: an Error with a status `code` and trailers. */
export function isServiceError(error: unknown): error is ServiceError {
  const candidate = error as Partial<ServiceError> | null;
  return (
    error instanceof Error &&
    typeof candidate?.code === "number" &&
    typeof candidate.metadata?.get === "function"
  );
}

/**
 * Decodes the `google.rpc.ErrorInfo` of a failed call from its `grpc-status-details-bin` trailer.
 *
 * @param error - what a call rejected with (anything: non-gRPC errors give `undefined`).
 * @returns `{ reason, domain, metadata }`, or `undefined` when the error carries no ErrorInfo.
 * @throws if the trailer is not a valid `google.rpc.Status` (a broken server, not a failed call).
 *
 * @example
 * try {
 *   await kpg.events.appendEvents({ ..., expectation: { $case: "expectedVersion", value: 0n } });
 * } catch (err) {
 *   if (errorInfo(err)?.reason === "WRONG_EXPECTED_VERSION") { ... }
 * }
 */
export function errorInfo(error: unknown): ErrorInfo | undefined {
  if (!isServiceError(error)) return undefined;
  for (const value of error.metadata.get(STATUS_DETAILS_KEY)) {
    if (typeof value === "string") continue; // a -bin key always holds a Buffer
    for (const detail of Status.decode(value).details) {
      if (typeName(detail.typeUrl) === ERROR_INFO_TYPE) return ErrorInfo.decode(detail.value);
    }
  }
  return undefined;
}

/** `type.googleapis.com/google.rpc.ErrorInfo` -> `google.rpc.ErrorInfo`. */
function typeName(typeUrl: string): string {
  return typeUrl.slice(typeUrl.lastIndexOf("/") + 1);
}
