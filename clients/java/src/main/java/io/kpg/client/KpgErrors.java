package io.kpg.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Message;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/**
 * Reads the contract's error details from a failed call.
 *
 * <p>Every error of a {@code kpg.v1} RPC carries a {@code google.rpc.ErrorInfo} (domain {@value #DOMAIN})
 * in the {@code grpc-status-details-bin} trailer; its {@code reason} is an {@code ErrorReason} name
 * without the {@code ERROR_REASON_} prefix, e.g. {@code WRONG_EXPECTED_VERSION}. Branch on the reason,
 * not on the message:
 *
 * <pre>{@code
 * } catch (StatusRuntimeException e) {
 *     if (KpgErrors.reason(e).equals("WRONG_EXPECTED_VERSION")) {
 *         long actual = Long.parseLong(KpgErrors.metadata(e).get("actual"));
 *     }
 * }
 * }</pre>
 */
public final class KpgErrors {
    /** The ErrorInfo domain of this API. */
    public static final String DOMAIN = "kpg";

    private KpgErrors() {}

    /** The gateway's ErrorInfo (domain {@value #DOMAIN}), if the error carries one. */
    public static Optional<ErrorInfo> errorInfo(StatusRuntimeException error) {
        return details(error, ErrorInfo.class).stream().filter(info -> DOMAIN.equals(info.getDomain())).findFirst();
    }

    /** The contract's reason, e.g. {@code "NOT_FOUND"}; empty when the error has no kpg ErrorInfo. */
    public static String reason(StatusRuntimeException error) {
        return errorInfo(error).map(ErrorInfo::getReason).orElse("");
    }

    /** The reason's metadata, e.g. {@code expected} and {@code actual}; empty when there is none. */
    public static Map<String, String> metadata(StatusRuntimeException error) {
        return errorInfo(error).map(ErrorInfo::getMetadataMap).orElse(Map.of());
    }

    /** The invalid fields of an {@code INVALID_ARGUMENT} error (field path to description), in order. */
    public static Map<String, String> fieldViolations(StatusRuntimeException error) {
        Map<String, String> violations = new LinkedHashMap<>();
        for (BadRequest bad : details(error, BadRequest.class)) {
            bad.getFieldViolationsList().forEach(v -> violations.put(v.getField(), v.getDescription()));
        }
        return violations;
    }

    /** The details of type {@code type} in the error's {@code google.rpc.Status}; undecodable ones are skipped. */
    private static <T extends Message> List<T> details(StatusRuntimeException error, Class<T> type) {
        Status status = StatusProto.fromThrowable(error);
        List<T> found = new ArrayList<>();
        if (status == null) {
            return found;
        }
        for (Any detail : status.getDetailsList()) {
            if (detail.is(type)) {
                try {
                    found.add(detail.unpack(type));
                } catch (InvalidProtocolBufferException e) {
                    // A detail that does not decode says nothing reliable: skip it.
                }
            }
        }
        return found;
    }
}
